"""tpavi.py: shapes, TPAVI's fast form vs the naive (THW)^2 form, L_AVM vs a loop re-statement, and
short CPU runs of the script (train + eval, AVSBench S4, resume, DDP with gloo, errors)."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import data
import fixtures_layouts as fl
import tpavi
from script_runner import add_a_day, assert_same_run, assert_wall_time_over_a_day, kill_after_first_epoch, run_script


def run(*argv, torchrun=False, check=True):
    return run_script("tpavi.py", *argv, torchrun=torchrun, check=check)


def quick_vpo(root, out, *extra):
    return ["--data", "vpo_ss", "--data-root", root, "--out", out, "--workers", "0", "--batch-size", "2",
            "--limit", "6", "--log-every", "1", *extra]


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("k,t,channels,size", [(22, 1, 2, (64, 48)), (1, 5, 1, (50, 70))])
def test_shapes(k, t, channels, size):
    """VPO (T = 1, K = 22, stereo) and AVSBench-like (T = 5, K = 1, mono) inputs, odd sizes included."""
    torch.manual_seed(0)
    model = tpavi.AVSModel("resnet18", "none", k, [0, 1, 2, 3], audio_channels=channels).eval()
    b = 2 if t == 1 else 1
    with torch.no_grad():
        wave = torch.randn(b, channels, t * 16000 if t > 1 else 48000)  # AVSBench: 1 s a frame; VPO: a 3 s clip
        logits, feats, audios = model(torch.randn(b, t, 3, *size), wave)
    assert logits.shape == (b * t, k, *size)
    assert [f.shape[:2] for f in feats] == [(b * t, 256)] * 4
    assert [f.shape[-1] for f in feats] == [math.ceil(size[1] / s) for s in (4, 8, 16, 32)]
    assert all(a.shape == (b, t, 256) for a in audios)


def test_pvt_stages_and_release_names(tmp_path):
    """A small PVT-v2 gives four maps at strides 4-32; the PVT release's parameter names load."""
    pvt = tpavi.PVTv2(dims=(8, 16, 24, 32), heads=(1, 2, 3, 4), depths=(1, 1, 1, 1)).eval()
    feats = pvt(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 8, 16, 16), (1, 16, 8, 8), (1, 24, 4, 4), (1, 32, 2, 2)]
    released = {k.replace("mlp.dwconv", "mlp.dwconv.dwconv"): torch.full_like(v, 0.5)
                for k, v in pvt.state_dict().items()}
    torch.save(dict(released, **{"head.weight": torch.zeros(3)}), tmp_path / "pvt.pth")
    matched, total = tpavi.load_state(pvt, str(tmp_path / "pvt.pth"), "--pretrained",
                                      lambda k: k.replace("dwconv.dwconv", "dwconv"))
    assert matched == total and bool((pvt.block1[0].mlp.dwconv.weight == 0.5).all())


def naive_tpavi(block, x, audio, valid=None):
    """The released TPAVIModule written out: theta, phi, g over all N = T*H*W positions of a clip,
    the full (THW x THW) matrix f = theta^T phi, y = (f / N) g (padded frames left out)."""
    b, t = audio.shape[:2]
    _, c, h, w = x.shape
    a = block.align(audio)
    audio_map = a[:, :, None, None, :].expand(b, t, h, w, c)  # audio broadcast over H x W
    theta = block.theta(x).view(b, t, -1, h, w).permute(0, 1, 3, 4, 2).reshape(b, t * h * w, -1)
    g = block.g(x).view(b, t, -1, h, w).permute(0, 1, 3, 4, 2).reshape(b, t * h * w, -1)
    phi = block.phi(audio_map).reshape(b, t * h * w, -1)
    keep = torch.ones(b, t) if valid is None else valid.to(x.dtype)
    keep = keep.to(x.dtype)[:, :, None].expand(b, t, h * w).reshape(b, 1, t * h * w)
    f = theta @ phi.transpose(1, 2) * keep  # (B, THW, THW)
    y = f @ g / keep.sum(-1, keepdim=True)
    y = y.view(b, t, h, w, -1).permute(0, 1, 4, 2, 3).reshape(b * t, -1, h, w)
    z = x + block.w_z(y)
    return block.norm(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), a


def test_tpavi_fast_form_equals_naive():
    torch.manual_seed(0)
    block = tpavi.TPAVI().double().eval()
    x, audio = torch.randn(6, 256, 5, 7, dtype=torch.double), torch.randn(2, 3, 128, dtype=torch.double)
    # W_z's BN starts at zero: the block is LayerNorm(x) until it learns
    identity = F.layer_norm(x.permute(0, 2, 3, 1), (256,)).permute(0, 3, 1, 2)
    assert torch.allclose(block(x, audio)[0], identity, atol=1e-6)
    with torch.no_grad():
        block.w_z[1].weight.normal_()
        block.w_z[1].bias.normal_()
        block.w_z[1].running_mean.normal_()
        block.w_z[1].running_var.uniform_(0.5, 2)
    for valid in (None, torch.tensor([[True, True, True], [True, False, True]])):
        fast, a_fast = block(x, audio, valid)
        slow, a_slow = naive_tpavi(block, x, audio, valid)
        assert (fast - slow).abs().max() < 1e-5 and torch.equal(a_fast, a_slow)
    assert (block(x, audio.flip(1))[0] - fast).abs().max() > 1e-3  # the audio matters


def avm_loops(logits, feats, audios, binary, weight=None):
    """Eq. (2) as the released loss, one frame / position at a time (block means = adaptive avg pooling
    when the sizes divide)."""
    n = logits.shape[0]
    total = 0.0
    for v, a in zip(feats, audios):
        a = a.reshape(n, -1)
        h, w = v.shape[-2:]
        sh, sw = logits.shape[-2] // h, logits.shape[-1] // w
        stage = 0.0
        for i in range(n):
            vis = torch.zeros(v.shape[1], dtype=torch.double)
            for y in range(h):
                for x in range(w):
                    cell = logits[i, :, y * sh:(y + 1) * sh, x * sw:(x + 1) * sw]
                    m = torch.sigmoid(cell[0].mean()) if binary else (cell.argmax(0) != 0).double().mean()
                    vis += torch.relu(v[i, :, y, x]) * m
            vis /= h * w
            p, q = torch.softmax(a[i], 0), torch.softmax(vis, 0)
            stage += (p * (p.log() - q.log())).sum() * (1 if weight is None else weight[i])  # KL(p_audio || q_visual)
        total += stage if weight is None else stage / weight.sum()
    return total / len(feats)


@pytest.mark.parametrize("k,weighted", [(1, False), (5, False), (5, True)])
def test_avm_loss_matches_loops(k, weighted):
    torch.manual_seed(0)
    b, t = 2, 2
    logits = torch.randn(b * t, k, 16, 16, dtype=torch.double)
    feats = [torch.randn(b * t, 12, s, s, dtype=torch.double) for s in (8, 4, 2)]
    audios = [torch.randn(b, t, 12, dtype=torch.double) for _ in feats]
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.double) if weighted else None
    fast = tpavi.avm_loss(logits, feats, audios, k == 1, weight)
    assert abs(fast.item() - avm_loops(logits, feats, audios, k == 1, weight).item()) < 1e-5


def test_seg_loss_ignores_255():
    torch.manual_seed(0)
    target = torch.randint(0, 2, (3, 4, 4))
    target[0] = 255
    logits = torch.randn(3, 1, 4, 4)
    keep = target != 255
    bce = F.binary_cross_entropy_with_logits(logits[:, 0][keep], target[keep].float())
    assert torch.allclose(tpavi.seg_loss(logits, target, True), bce)
    logits = torch.randn(3, 5, 4, 4)
    assert torch.allclose(tpavi.seg_loss(logits, target, False), F.cross_entropy(logits, target, ignore_index=255))


# ----------------------------------------------------------------------------- script runs


def load_json(path):
    with open(path) as f:
        return json.load(f)


def test_vpo_train_eval_and_exact_resume(tiny_vpo, tmp_path):
    """2 iterations + eval write the run files; 2 + resume 2 == 4 straight (3 iterations an epoch)."""
    split, straight = tmp_path / "split", tmp_path / "straight"
    run(*quick_vpo(tiny_vpo, split, "--epochs", "2", "--max-iters", "2", "--no-amp", "--overlays", "2"))
    for name in ("last.pt", "best.pt", "metrics.json", "log.txt"):
        assert (split / name).is_file(), name
    assert len(list((split / "overlays").glob("*.png"))) == 2
    m = load_json(split / "metrics.json")
    assert m["args"]["backbone"] == "resnet18" and m["args"]["builtin"]  # built-in VPO: CPU defaults
    assert m["final"]["split"] == "test" and math.isfinite(m["final"]["miou"]) and math.isfinite(m["best"]["score"])
    assert torch.load(split / "last.pt", weights_only=True)["iteration"] == 2

    proc = run("--resume", split / "last.pt", *quick_vpo(tiny_vpo, split, "--epochs", "2", "--max-iters", "4",
                                                            "--no-amp", "--overlays", "0"))
    assert "resumed" in proc.stdout
    run(*quick_vpo(tiny_vpo, straight, "--epochs", "2", "--max-iters", "4", "--no-amp", "--overlays", "0"))
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (split, straight))
    assert a["iteration"] == b["iteration"] == 4 and a["epoch"] == b["epoch"] == 1
    diff = max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in b["model"])
    assert diff <= 1e-6, diff
    assert [h["iteration"] for h in a["history"]] == [2, 3, 4] and [h["iteration"] for h in b["history"]] == [3, 4]

    before = (straight / "metrics.json").read_bytes()  # audio alignment files go beside it
    for audio in ("silence", "absent"):
        proc = run(*quick_vpo(tiny_vpo, straight, "--eval-only", "--ckpt", straight / "last.pt", "--no-amp",
                              "--overlays", "0", "--eval-audio", audio))
        res = load_json(straight / f"eval-{audio}.json")["eval"]
        assert res["fg_true"] == 0 and res["fg_pred"] == pytest.approx(1 - res["pixel_acc"])
        assert f"{audio} audio: {100 * res['fg_pred']:.2f}% of the pixels" in proc.stdout
    assert (straight / "metrics.json").read_bytes() == before


def test_resume_after_epochs_and_sigkill_is_exact(tiny_vpo, tmp_path):
    """--workers 0, 3 iterations an epoch: 3 epochs straight == 1 epoch (--max-iters 3) + --resume ==
    SIGKILL during epoch 3 + --resume from the intact last.pt of epoch 2 (--save-every 2: none after
    epoch 1), bit for bit."""
    straight, split, killed = tmp_path / "straight", tmp_path / "split", tmp_path / "killed"

    def argv(out, *extra):
        return quick_vpo(tiny_vpo, out, "--epochs", "3", "--no-amp", "--overlays", "0", *extra)
    run(*argv(straight))
    run(*argv(split, "--max-iters", "3"))
    add_a_day(split / "last.pt")
    run(*argv(split, "--resume", split / "last.pt"))
    assert_wall_time_over_a_day(split)  # the wall time carries over a resume
    assert kill_after_first_epoch("tpavi.py", argv(killed, "--save-every", "2"), killed)["iteration"] == 6
    run(*argv(killed, "--resume", killed / "last.pt", "--save-every", "2"))
    assert_same_run(straight, split)
    assert_same_run(straight, killed)
    with pytest.raises(data.DataError, match=r"last.pt was trained with --pan csv \(now crop\), --seed 0 \(now 1\)"):
        tpavi.main(tpavi.parse_args(list(map(str, argv(split, "--resume", split / "last.pt", "--seed", "1",
                                                       "--pan", "crop")))))


def test_foreign_or_corrupt_checkpoint(tmp_path):
    """A cavp.py checkpoint or a corrupt file: a one-line error naming the file."""
    torch.save(dict(script="cavp", model={}, args={}), tmp_path / "cavp.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    for name, needle in (("cavp.pt", "not a tpavi.py checkpoint (written by cavp.py)"),
                         ("bad.pt", "not a readable checkpoint")):
        with pytest.raises(data.DataError, match=r"^\S*" + name + ": " + re.escape(needle)):
            tpavi.main(tpavi.parse_args(["--resume", str(tmp_path / name), "--out", str(tmp_path / "o")]))


def test_avsbench_s4_train_eval(tmp_path):
    """Binary AVSBench-Objects: BCE + L_AVM, val during training, best.pt on test, M_J / M_F, overlays,
    then --eval-only of best.pt."""
    root = fl.write_s4(str(tmp_path / "avs"), [("a", "dog", "train"), ("b", "cat", "train"), ("c", "dog", "val"),
                                                ("d", "cat", "test")])
    out = tmp_path / "run"
    run("--data", "avsbench_s4", "--data-root", root, "--out", out, "--backbone", "resnet18", "--pretrained", "none",
        "--crop", "32", "--lambda-avm", "0.5", "--epochs", "1", "--max-iters", "2", "--batch-size", "2",
        "--workers", "0", "--overlays", "3")
    m = load_json(out / "metrics.json")
    assert [h["split"] for h in m["history"]] == ["val"]
    assert m["final"]["split"] == "test" and m["final"]["weights"] == "best"
    assert all(math.isfinite(m["final"][key]) for key in ("mj", "mf", "miou"))
    assert sorted(p.name for p in (out / "overlays").glob("*.png")) == ["d_0.png", "d_1.png", "d_2.png"]
    run("--data", "avsbench_s4", "--data-root", root, "--out", out / "eval", "--crop", "32", "--workers", "0",
        "--eval-only", "--ckpt", out / "best.pt", "--overlays", "0")
    assert load_json(out / "eval" / "eval-real.json")["eval"]["mj"] == pytest.approx(m["final"]["mj"])


def test_ddp_gloo_one_step(tiny_vpo, tmp_path):
    out = tmp_path / "ddp"
    proc = run(*quick_vpo(tiny_vpo, out, "--epochs", "1", "--max-iters", "1", "--limit", "4", "--overlays", "0"),
               torchrun=True)
    assert "2 rank(s)" in proc.stdout and "SyncBatchNorm" in proc.stdout
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 1 and (out / "metrics.json").is_file()


@pytest.mark.parametrize("argv,needle", [
    (["--tpavi-stages", "4"], "--tpavi-stages"),
    (["--eval-only"], "--ckpt"),
    (["--ckpt", "x.pt"], "--eval-only"),
    (["--audio-encoder", "vggish"], "--vggish-weights"),
    (["--tpavi-stages", "--lambda-avm", "0.5"], "L_AVM"),
    (["--batch-size", "0"], ">= 1"),
    (["--data", "avsbench"], "invalid choice"),
    (["--eval-audio", "absent"], "--eval-audio absent is for --eval-only on a VPO --data"),
    (["--data", "avsbench_s4", "--eval-only", "--ckpt", "x.pt", "--eval-audio", "silence"], "VPO --data"),
])
def test_bad_flags(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        tpavi.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_bad_combinations_and_missing_data(tmp_path, tiny_vpo):
    with pytest.raises(data.DataError, match="PVT"):
        tpavi.main(tpavi.parse_args(["--data-root", tiny_vpo, "--backbone", "pvt_v2_b5", "--pretrained", "imagenet",
                                     "--out", str(tmp_path / "p")]))
    with pytest.raises(data.DataError, match="AVSBench"):
        tpavi.main(tpavi.parse_args(["--data", "avss", "--data-root", str(tmp_path / "none"),
                                     "--out", str(tmp_path / "a"), "--backbone", "resnet18", "--pretrained", "none"]))
    missing = tmp_path / "nowhere"
    proc = run("--data", "vpo_ms", "--data-root", missing, "--out", tmp_path / "m", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert str(missing) in proc.stderr and "vpo_make.py" in proc.stderr


def test_vpo_msmi_twin_metrics(tiny_vpo, tmp_path):
    """VPO-MSMI: the twin metrics, once with the real stereo and once with left and right swapped."""
    out = tmp_path / "msmi"
    argv = quick_vpo(tiny_vpo, out, "--epochs", "1", "--max-iters", "1", "--no-amp", "--overlays", "0")
    proc = run(*[("vpo_msmi" if a == "vpo_ss" else a) for a in argv])
    final = load_json(out / "metrics.json")["final"]
    assert final["twin_images"] > 0 and 0 <= final["twin_recall"] <= 1 and 0 <= final["twin_share_swap"] <= 1
    assert "twins (" in proc.stdout and "L/R swapped" in proc.stdout
