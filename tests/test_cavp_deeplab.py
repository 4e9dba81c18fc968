"""cavp.py's DeepLabV3+ against torchvision's reference (dilated ResNet, ASPP), and the one-line
error for a checkpoint of the earlier DeepLabV3+."""
import pytest
import torch

import cavp
import data
import tpavi

RUN = ["--data", "vpo_msmi", "--workers", "0", "--batch-size", "4", "--limit", "8", "--no-amp"]


def conv_geometry(module):
    return [(m.kernel_size, m.stride, m.dilation, m.padding) for m in module.modules()
            if isinstance(m, torch.nn.Conv2d)]


def test_dilated_resnet50_is_torchvision_deeplabv3s_backbone():
    """Output stride 8: layers 1-4 as torchvision's DeepLabV3 backbone (a dilated stage's first block
    at the previous rate); 16: layer4 alone dilated, as replace_stride_with_dilation [F, F, T]."""
    from torchvision.models import resnet50
    from torchvision.models.segmentation import deeplabv3_resnet50
    ours = cavp.DeepLabV3Plus("resnet50", "none", 8)
    ref = deeplabv3_resnet50(weights=None, weights_backbone=None).backbone
    for name in ("layer1", "layer2", "layer3", "layer4"):
        assert conv_geometry(getattr(ours, name)) == conv_geometry(getattr(ref, name)), name
    ours16 = cavp.DeepLabV3Plus("resnet50", "none", 16)
    ref16 = resnet50(replace_stride_with_dilation=[False, False, True])
    assert conv_geometry(ours16.layer4) == conv_geometry(ref16.layer4)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_resnet18_follows_torchvisions_rule(output_stride):
    """resnet18 (BasicBlock, which torchvision does not dilate): per stage the rates that
    replace_stride_with_dilation gives resnet50's blocks, and the features at 1/output_stride."""
    from torchvision.models import resnet50
    ours = cavp.DeepLabV3Plus("resnet18", "none", output_stride)
    ref = resnet50(replace_stride_with_dilation=[False, output_stride == 8, True])
    for name in ("layer2", "layer3", "layer4"):
        rates = [{c.dilation for c in b.modules() if isinstance(c, torch.nn.Conv2d)
                  and c.kernel_size == (3, 3)} for b in getattr(ours, name)]
        assert rates == [{b.conv2.dilation} for b in getattr(ref, name)[:len(rates)]], name
    x = ours.layer4(ours.layer3(ours.layer2(ours.layer1(ours.stem(torch.zeros(1, 3, 64, 64))))))
    assert x.shape[-1] == 64 // output_stride


@pytest.mark.parametrize("output_stride", [8, 16])
def test_aspp_is_torchvisions(output_stride):
    """The ASPP's layers and tensors as torchvision's (image pooling with BatchNorm), rates 6/12/18
    at output stride 16 and doubled at 8 (DeepLabV3, Sec. 3.3); only the dropout rate differs."""
    from torchvision.models.segmentation.deeplabv3 import ASPP
    rates = [6, 12, 18] if output_stride == 16 else [12, 24, 36]
    ours, ref = cavp.DeepLabV3Plus("resnet18", "none", output_stride).aspp, ASPP(512, rates)
    kinds = [torch.nn.Conv2d if isinstance(m, torch.nn.Conv2d) else type(m)
             for m in ours.modules() if not list(m.children())]
    assert kinds == [type(m) for m in ref.modules() if not list(m.children())]
    assert conv_geometry(ours) == conv_geometry(ref)
    assert [v.shape for v in ours.state_dict().values()] == \
        [v.shape for v in ref.state_dict().values()]
    ours.eval(), ref.eval()
    ref.load_state_dict(dict(zip(ref.state_dict(), ours.state_dict().values())))
    x = torch.randn(2, 512, 5, 7)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("script", [cavp, tpavi])
@pytest.mark.parametrize("size", [(1, 2), (4, 5), (6, 6), (4, 9), (7, 7)])
def test_atrous_conv_on_small_maps_is_nn_conv2d(script, size):
    """AtrousConv against nn.Conv2d with the same weights at rate 6, on maps smaller than, equal to
    and larger than the rate (the centre-tap shortcut where the rate covers both sides): output and
    the gradients of input, weight and bias; the off-centre taps get no gradient where it applies."""
    torch.manual_seed(sum(size))
    ours = script.AtrousConv(8, 5, 3, padding=6, dilation=6, bias=script is tpavi)
    ref = torch.nn.Conv2d(8, 5, 3, padding=6, dilation=6, bias=script is tpavi)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, *size, requires_grad=True)
    y, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *ours.parameters()], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    if max(size) <= 6:
        assert grads[1][:, :, 1, 1].abs().sum() > 0
        off_centre = grads[1].clone()
        off_centre[:, :, 1, 1] = 0
        assert not off_centre.any()


def test_checkpoint_of_the_earlier_deeplab_is_one_line(tiny_vpo, tmp_path, capsys):
    """A checkpoint whose DeepLabV3+ has no BatchNorm in ASPP image pooling (an earlier cavp.py):
    --resume, --eval-only and --predict end with one line saying so."""
    out = tmp_path / "run"
    cavp.main(cavp.parse_args(RUN + ["--data-root", tiny_vpo, "--out", str(out), "--max-iters", "1",
                                     "--eval-every", "100", "--epochs", "1", "--overlays", "0"]))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("visual.aspp.pool.2")}
    old = str(tmp_path / "old.pt")
    torch.save(ckpt, old)
    image, wav = str(tmp_path / "x.png"), str(tmp_path / "x.wav")
    from PIL import Image
    Image.new("RGB", (8, 8)).save(image)
    data.write_wav(wav, torch.zeros(1, 800).numpy(), 8000)
    for argv in (["--resume", old], ["--eval-only", "--ckpt", old],
                 ["--predict", image, "--audio", wav, "--ckpt", old]):
        with pytest.raises(data.DataError, match="earlier cavp.py whose DeepLabV3\\+ differs"):
            cavp.main(cavp.parse_args(argv + ["--data-root", tiny_vpo, "--out", str(tmp_path)]))
