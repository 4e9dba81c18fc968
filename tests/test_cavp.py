"""cavp.py end to end on the tiny built-in VPO: shapes, attention, training runs, resume, DDP, errors."""
import json
import math
import re
from argparse import Namespace

import pytest
import torch

import cavp
import data
from script_runner import add_a_day, assert_same_run, assert_wall_time_over_a_day, kill_after_first_epoch, run_script


def run(*argv, torchrun=False, check=True):
    return run_script("cavp.py", *argv, torchrun=torchrun, check=check)


def quick(tiny_vpo, out, *extra):
    return ["--data", "vpo_msmi", "--data-root", tiny_vpo, "--out", out, "--workers", "0", "--batch-size", "4",
            "--limit", "8", "--log-every", "1", *extra]


@pytest.mark.parametrize("fusion,attn,mono", [("ca", "sigmoid", False), ("ca", "softmax", True),
                                              ("ca", "minmax", False), ("tpavi", "sigmoid", False)])
def test_shapes(fusion, attn, mono):
    args = Namespace(backbone="resnet18", pretrained="none", output_stride=8, fusion=fusion, attn=attn, heads=4,
                     pos_enc="none", audio_conv1="split", mono=mono)
    model = cavp.CAVPModel(args, num_classes=22).eval()
    image, mel = torch.randn(2, 3, 64, 48), torch.randn(3, 1 if mono else 2, 300, 64)
    with torch.no_grad():
        logits, z, attn_map = model(image, mel[:2])
        assert logits.shape == (2, 22, 64, 48) and z.shape == (2, 304, 16, 12) and attn_map.shape == (2, 16, 12)
        # Eq. (1) re-pairs: image 0 with clip 1, image 1 with clip 2 (e.g. a bank clip)
        logits2, z2, attn2 = model(image, torch.cat([mel[:2], mel[1:3]]))
        assert logits2.shape == (2, 22, 64, 48) and z2.shape == (4, 304, 16, 12) and attn2.shape == (4, 16, 12)
        torch.testing.assert_close(logits2, logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(z2[:2], z, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(z2[2:3], model(image[:1], mel[1:2])[1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(z2[3:4], model(image[1:], mel[2:3])[1], atol=1e-4, rtol=1e-4)
        assert (z2[2] - z[0]).abs().max() > 0  # the audio matters


@pytest.mark.parametrize("fusion", ["ca", "tpavi"])
def test_fusion_of_several_clips_per_image_against_a_loop(fusion):
    """Training fuses image i with clips i and b + i (its pair and its re-pair): the visual side,
    computed once per image, gives what fusing every (image, clip) pair on its own gives, and the
    same gradients."""
    torch.manual_seed(0)
    block = cavp.CrossAttention(32, 4, "sigmoid") if fusion == "ca" else cavp.AudioQueryFusion(32, 4)
    u_v, u_a = torch.randn(3, 20, 32, requires_grad=True), torch.randn(6, 32, requires_grad=True)
    z, a = block(u_v, u_a, (4, 5))
    loop = [block(u_v[j % 3][None], u_a[j][None], (4, 5)) for j in range(6)]
    torch.testing.assert_close(z, torch.cat([x for x, _ in loop]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a, torch.cat([y for _, y in loop]), atol=1e-6, rtol=1e-5)
    got = torch.autograd.grad(z.square().sum() + a.sum(), (u_v, u_a))
    want = torch.autograd.grad(sum(x.square().sum() + y.sum() for x, y in loop), (u_v, u_a))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_re_pairs_fused_at_the_kept_tokens_only():
    """keep (the anchors' tokens of the re-pairs): z of the pairs and at the kept re-pair tokens is the
    full fusion's, every other re-pair token 0; the gradients of a loss on those tokens are the full
    fusion's. re_pair_tokens picks this rank's re-pair anchors out of plan_anchors' global indices."""
    torch.manual_seed(0)
    block = cavp.CrossAttention(32, 4, "sigmoid")
    u_v, u_a = torch.randn(3, 20, 32, requires_grad=True), torch.randn(6, 32, requires_grad=True)
    keep = torch.tensor([0, 7, 19, 20, 44, 59])
    full, _ = block(u_v, u_a, (4, 5))
    part, _ = block(u_v, u_a, (4, 5), keep)
    rows = torch.cat([torch.arange(60), 60 + keep])
    full, part = full.reshape(120, 32), part.reshape(120, 32)
    torch.testing.assert_close(part[rows], full[rows], atol=1e-6, rtol=1e-5)
    assert (part[60:].abs().sum(1) > 0).sum() == keep.numel()
    weight = torch.randn(rows.numel(), 32)
    got = torch.autograd.grad((part[rows] * weight).sum(), (u_v, u_a, *block.parameters()))
    want = torch.autograd.grad((full[rows] * weight).sum(), (u_v, u_a, *block.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    # 2 ranks x b = 2 pairs of 2 x 3 tokens: anchors (pair * 6 + pixel) over 4 pairs, then 4 re-pairs
    idx = torch.tensor([1, 7, 26, 27, 33, 40, 47, 45, 26])
    assert cavp.re_pair_tokens(idx, 4, 2, (2, 3), 0).tolist() == [2, 3, 9]  # re-pairs 0 and 1
    assert cavp.re_pair_tokens(idx, 4, 2, (2, 3), 1).tolist() == [4, 9, 11]  # re-pairs 2 and 3


def test_attention_activations():
    s = torch.randn(2, 4, 30, 1) * 3
    for name, check in [("sigmoid", lambda a: torch.allclose(a, torch.sigmoid(s))),
                        ("softmax", lambda a: torch.allclose(a.sum(2), torch.ones(2, 4, 1))),
                        ("minmax", lambda a: torch.allclose(a.amin(2), torch.zeros(2, 4, 1)) and
                         torch.allclose(a.amax(2), torch.ones(2, 4, 1), atol=1e-5))]:
        block = cavp.CrossAttention(8, 4, name)
        assert check(block.activation(s)), name


def test_flip_keeps_stereo_side(tiny_vpo):
    """Through the training augmentation, a single source's stereo side matches its mask's side."""
    ds = data.VPODataset(tiny_vpo, "msmi", "train", train=True, crop=None)
    torch.manual_seed(0)
    checked = 0
    for _ in range(3):
        for i in range(len(ds)):
            s = ds[i]
            if s["audio_pos"] < 0 or abs(float(s["audio_pos"]) - 0.5) < 0.15:
                continue
            ys, xs = torch.nonzero((s["mask"] > 0) & (s["mask"] != 255), as_tuple=True)
            com = xs.float().mean() / s["mask"].shape[1]
            left, right = s["wave"].abs().sum(1)
            assert (com < 0.5) == bool(left > right), (i, float(com), float(left), float(right))
            assert abs(float(s["audio_pos"]) - float(com)) < 0.15
            checked += 1
    assert checked >= 4


def test_train_eval_stereo_and_mono(tiny_vpo, tmp_path):
    for mono in (False, True):
        out = tmp_path / f"run{int(mono)}"
        proc = run(*quick(tiny_vpo, out, "--epochs", "1", "--max-iters", "2", "--overlays", "2",
                          *(["--mono"] if mono else [])))
        assert "img/s" in proc.stdout and "eta" in proc.stdout
        assert "mIoU" in proc.stdout and "background" in proc.stdout  # per-class table
        for name in ("last.pt", "best.pt", "metrics.json", "log.txt"):
            assert (out / name).is_file(), name
        assert len(list((out / "overlays").glob("*.png"))) == 2
        m = json.loads((out / "metrics.json").read_text())
        for key in ("miou", "mean_fbeta", "mean_fdr"):
            assert math.isfinite(m["final"][key])
        assert m["final"]["miou"] == m["best"]["miou"]
        # twin metrics on the multi-instance test images; with stereo also with the channels swapped
        assert m["final"]["twin_images"] > 0 and 0 <= m["final"]["twin_recall"] <= 1
        assert ("twin_recall_swap" in m["final"]) != mono and "twins (" in proc.stdout
        ckpt = torch.load(out / "last.pt", weights_only=True)
        assert ckpt["iteration"] == 2 and ckpt["args"]["mono"] == mono
    proc = run("--data", "vpo_msmi", "--data-root", tiny_vpo, "--eval-only", "--ckpt", out / "best.pt",
               "--out", tmp_path / "ev", "--workers", "0", "--limit", "4")
    assert json.loads((tmp_path / "ev" / "eval-real.json").read_text())["eval"]["miou"] >= 0
    # audio alignment: evaluated into the run folder, beside (never over) the training metrics.json
    before = (out / "metrics.json").read_bytes()
    for audio in ("real", "silence", "absent"):
        proc = run("--data", "vpo_msmi", "--data-root", tiny_vpo, "--eval-only", "--ckpt", out / "last.pt",
                   "--out", out, "--workers", "0", "--overlays", "0", "--eval-audio", audio)
        res = json.loads((out / f"eval-{audio}.json").read_text())["eval"]
        if audio == "real":
            assert res["miou"] == pytest.approx(m["final"]["miou"]) and res["fg_true"] > 0
        else:
            assert f"{audio} audio: {100 * res['fg_pred']:.2f}% of the pixels" in proc.stdout
            assert res["fg_true"] == 0 and res["fg_pred"] == pytest.approx(1 - res["pixel_acc"])
    assert (out / "metrics.json").read_bytes() == before


def test_resume_after_epochs_and_sigkill_is_exact(tiny_vpo, tmp_path):
    """--workers 0, 2 iterations an epoch: 3 epochs straight == 1 epoch (--max-iters 2) + --resume == SIGKILL
    during epoch 3 + --resume from the intact last.pt of epoch 2 (--save-every 2: none after epoch 1), bit
    for bit (memory bank included)."""
    straight, split, killed = tmp_path / "straight", tmp_path / "split", tmp_path / "killed"

    def argv(out, *extra):
        return quick(tiny_vpo, out, "--epochs", "3", "--overlays", "0", *extra)
    run(*argv(straight))
    run(*argv(split, "--max-iters", "2"))
    add_a_day(split / "last.pt")
    run(*argv(split, "--resume", split / "last.pt"))
    assert_wall_time_over_a_day(split)  # the wall time carries over a resume
    assert kill_after_first_epoch("cavp.py", argv(killed, "--save-every", "2"), killed)["iteration"] == 4
    run(*argv(killed, "--resume", killed / "last.pt", "--save-every", "2"))
    assert_same_run(straight, split)
    assert_same_run(straight, killed)
    with pytest.raises(data.DataError, match=r"last.pt was trained with --pan csv \(now crop\): pass the run's"):
        cavp.main(cavp.parse_args(list(map(str, argv(split, "--resume", split / "last.pt", "--pan", "crop")))))
    states = [torch.load(d / "last.pt", weights_only=True)["extra"]["criterion"] for d in (straight, split)]
    banks = [state["bank"] for state in states]
    assert torch.equal(banks[0]["count"], banks[1]["count"]) and torch.equal(banks[0]["waves"], banks[1]["waves"])
    assert torch.equal(states[0]["generator"], states[1]["generator"])


def test_foreign_or_corrupt_checkpoint(tmp_path):
    """A tpavi.py checkpoint or a corrupt file: a one-line error naming the file."""
    torch.save(dict(script="tpavi", model={}, args={}), tmp_path / "tpavi.pt")
    torch.save(dict(script="cavp", model={}, args=dict(backbone="resnet18"), extra=dict(bank={})), tmp_path / "old.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    for name, needle in (("tpavi.pt", "not a cavp.py checkpoint (written by tpavi.py)"),
                         ("old.pt", "written by an older cavp.py (no output_stride"),
                         ("bad.pt", "not a readable checkpoint")):
        with pytest.raises(data.DataError, match=r"^\S*" + name + ": " + re.escape(needle)):
            cavp.main(cavp.parse_args(["--resume", str(tmp_path / name), "--out", str(tmp_path / "o")]))


def test_ddp_gloo_one_step(tiny_vpo, tmp_path):
    out = tmp_path / "ddp"
    proc = run(*quick(tiny_vpo, out, "--epochs", "1", "--max-iters", "1"), torchrun=True)
    assert (out / "last.pt").is_file()
    assert "SyncBatchNorm needs CUDA" in proc.stdout


@pytest.mark.parametrize("argv,needle", [
    (["--data-root", "/nonexistent/vpo"], "/nonexistent/vpo"),
    (["--pos-share", "2"], "--pos-share"),
    (["--eval-only"], "--ckpt"),
    (["--data", "vpo_xx"], "--data"),
    (["--resume", "/nonexistent/last.pt"], "/nonexistent/last.pt"),
    (["--eval-only", "--ckpt", "pytest.ini"], "pytest.ini: not a readable checkpoint"),
    (["--eval-audio", "silence"], "--eval-audio silence is for --eval-only"),
    (["--match", "side", "--mono"], "--match side compares stereo positions"),
    (["--mel-hop", "30"], "--mel-hop must be 1..25 ms"),
    (["--mel-bands", "96"], "--mel-bands must be 8..80"),
    (["--clip-ms", "200"], "--clip-ms must be 320..3000"),
])
def test_clear_errors(tiny_vpo, tmp_path, argv, needle):
    base = ["--data-root", tiny_vpo, "--out", tmp_path / "e", "--workers", "0"]
    proc = run(*base, *argv, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1]


def test_builtin_demo_settings(tiny_vpo, tmp_path):
    """On the built-in VPO an 80-epoch run evaluates at epochs 40 and 80 (an evaluation costs about
    an epoch there), trains on crops of the image side with 150 x 64 log-mels of the audio's centre
    1.5 s, loading in the training process, last.pt after every 10th epoch; elsewhere the paper's values
    (every 5 epochs, crop 512, 300 x 64 over 3 s, 4 loader workers, last.pt after each epoch); a given
    flag wins."""
    def settings(root, *argv):
        args = cavp.parse_args(["--data-root", str(root), *argv])
        args = cavp.resolve_defaults(args, args.given)
        return (args.eval_every, args.crop, args.clip_ms, args.mel_hop, args.mel_bands, args.workers,
                args.save_every)
    assert settings(tiny_vpo) == (40, 64, 1500, 10, 64, 0, 10)
    assert settings(tmp_path) == (5, 512, 3000, 10, 64, 4, 1)
    assert settings(tiny_vpo, "--eval-every", "1", "--crop", "48", "--clip-ms", "3000", "--save-every", "1") == \
        (1, 48, 3000, 10, 64, 0, 1)
    assert cavp.log_mel(cavp.parse_args([]))(torch.zeros(1, 2, 48000)).shape == (1, 2, 300, 64)
    assert cavp.log_mel(cavp.parse_args(["--clip-ms", "1500", "--mel-bands", "32"]))(
        torch.zeros(1, 2, 48000)).shape == (1, 2, 150, 32)
