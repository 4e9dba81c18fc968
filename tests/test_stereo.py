"""The stereo path: f_CA's position code (--pos-enc) and stereo audio encoders that see the side
at init (--audio-conv1; tpavi.py's audio ResNet-18)."""
import math
import types

import numpy as np
import pytest
import torch
import torchvision

import cavp
import data
import tpavi
import vpo_make


def test_sine_position_code_matches_formula():
    h, w, dim, temp = 3, 5, 16, 10000.0
    got = cavp.sine_position_code(h, w, dim, temp)
    assert got.shape == (h * w, dim)
    f = dim // 4
    for r in range(h):
        for c in range(w):
            y, x = 2 * math.pi * (r + 0.5) / h, 2 * math.pi * (c + 0.5) / w
            for i in range(f):
                om = temp ** (-i / f)
                want = {2 * i: math.sin(om * y), 2 * i + 1: math.cos(om * y),
                        dim // 2 + 2 * i: math.sin(om * x), dim // 2 + 2 * i + 1: math.cos(om * x)}
                for ch, v in want.items():
                    assert abs(got[r * w + c, ch].item() - v) < 1e-5, (r, c, ch)
    assert cavp.sine_position_code(16, 12, 304).shape == (192, 304)  # f_CA's dim: 76 frequencies per axis
    with pytest.raises(ValueError, match="multiple of 4"):
        cavp.sine_position_code(4, 4, 302)


@pytest.mark.parametrize("attn", ["sigmoid", "softmax", "minmax"])
def test_position_code_tells_left_from_right(attn):
    """Every token holds the same feature: only a position code can make a left and a right pixel differ."""
    h, w, dim = 4, 6, 304
    u_v = torch.randn(2, 1, dim).expand(2, h * w, dim)
    u_a = torch.randn(2, dim)
    out = {}
    for pos_enc in ("none", "sine"):
        torch.manual_seed(0)
        block = cavp.CrossAttention(dim, 4, attn, pos_enc).eval()
        with torch.no_grad():
            z, a = block(u_v, u_a, (h, w))
        out[pos_enc] = z.view(2, h, w, dim), a.view(2, h, w)
    z, a = out["none"]
    torch.testing.assert_close(z[:, :, 0], z[:, :, -1])
    torch.testing.assert_close(a, a[:, :1, :1].expand_as(a))
    z, a = out["sine"]
    assert (z[:, :, 0] - z[:, :, -1]).abs().amax() > 1e-2
    assert (a[:, :, 0] - a[:, :, -1]).abs().amax() > 1e-3


def test_model_wires_position_code_and_flags():
    args = dict(backbone="resnet18", pretrained="none", output_stride=16, fusion="ca", attn="sigmoid", heads=4,
                audio_conv1="split", mono=False)
    torch.manual_seed(0)
    plain = cavp.CAVPModel(types.SimpleNamespace(pos_enc="none", **args), 22).eval()
    coded = cavp.CAVPModel(types.SimpleNamespace(pos_enc="sine", **args), 22).eval()
    coded.load_state_dict(plain.state_dict())  # the code has no parameters: same weights
    image, mel = torch.randn(1, 3, 64, 64), torch.randn(1, 2, 300, 64)
    with torch.no_grad():
        assert (plain(image, mel)[1] - coded(image, mel)[1]).abs().amax() > 1e-3
    assert {"pos_enc", "audio_conv1"} <= set(cavp.CKPT_KEYS)


def test_pos_enc_needs_f_ca(capsys):
    with pytest.raises(SystemExit):
        cavp.parse_args(["--pos-enc", "sine", "--fusion", "tpavi"])
    assert "--pos-enc sine" in capsys.readouterr().err
    assert cavp.parse_args([]).pos_enc == "none" and cavp.parse_args([]).audio_conv1 == "split"


def waves(*sources):
    """Stereo clips (n, 2, 48000) of built-in class sounds k panned at alpha: sources = (k, alpha), ..."""
    return torch.stack([data.pan(torch.from_numpy(vpo_make.synth_sound(np.random.default_rng(0), k, 48000))
                                 .float()[None], alpha) for k, alpha in sources])


def swap_ratio(encoder, x):
    """|e(a) - e(a with L and R swapped)| / |e(a) - e(b)| for the two inputs a, b of x (B, 2, ...), at init."""
    with torch.no_grad():
        e = encoder.eval()(torch.cat([x, x[:1].flip(1)]))
    return ((e[0] - e[2]).norm() / (e[0] - e[1]).norm()).item()


@pytest.fixture
def fake_imagenet(monkeypatch):
    """--pretrained imagenet without a download: torchvision's weights API hands out a fixed ResNet-18 state
    dict whose conv1 is the same for R, G and B (so the old mean-over-RGB init is that filter exactly)."""
    torch.manual_seed(123)
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = state["conv1.weight"][:, :1].repeat(1, 3, 1, 1)
    weights = types.SimpleNamespace(get_state_dict=lambda progress: state, url="fake://resnet18")
    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda name: types.SimpleNamespace(
        IMAGENET1K_V1=weights))
    return state


def test_stereo_conv1_sees_the_side_under_imagenet(fake_imagenet):
    mel = data.LogMel(frames=300)(waves((3, 0.2), (11, 0.2)))  # two classes of sound, both on the left
    ratio = {}
    for conv1 in ("mean", "split"):
        torch.manual_seed(0)
        enc = cavp.AudioEncoder(2, 304, "imagenet", conv1)
        w = enc.net.conv1.weight.detach()
        torch.testing.assert_close((w[:, :1] + w[:, 1:]) / 2, fake_imagenet["conv1.weight"][:, :1])  # s on L + R
        ratio[conv1] = swap_ratio(enc, mel)
    # mean: the same filter on L and R, blind to the side (the defect); split: an L/R swap moves the
    # embedding by a sizeable share of the distance between two different sounds (3.7e-6 and 0.90 here)
    assert ratio["mean"] < 1e-4
    assert ratio["split"] > 0.3
    torch.manual_seed(0)
    mono = cavp.AudioEncoder(1, 304, "imagenet", "split").net.conv1.weight
    torch.testing.assert_close(mono, fake_imagenet["conv1.weight"][:, :1])  # mono: ImageNet's filter, unchanged


def test_stereo_conv1_from_scratch():
    """--pretrained none: split is a plain fresh conv1 (the released code's), mean the blind-at-init control."""
    torch.manual_seed(0)
    torchvision.models.resnet18(weights=None)
    fresh = torch.nn.Conv2d(2, 64, 7, 2, 3, bias=False).weight  # the draws AudioEncoder makes
    mel = data.LogMel(frames=300)(waves((3, 0.2), (11, 0.2)))
    ratio = {}
    for conv1 in ("mean", "split"):
        torch.manual_seed(0)
        enc = cavp.AudioEncoder(2, 304, "none", conv1)
        if conv1 == "split":
            torch.testing.assert_close(enc.net.conv1.weight, fresh)
        ratio[conv1] = swap_ratio(enc, mel)
    assert ratio["mean"] < 1e-4 and ratio["split"] > 0.3


def test_tpavi_audio_encoder_sees_the_side():
    """tpavi.py's audio ResNet-18 never loads ImageNet weights (any --pretrained is the image encoder's):
    its two-channel conv1 is fresh, so it has no blind start to fix; an L/R swap moves it at init."""
    torch.manual_seed(0)
    assert swap_ratio(tpavi.AudioResNet18(2), waves((3, 0.2), (11, 0.2))) > 0.3
