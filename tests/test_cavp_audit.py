"""cavp.py around the method: a silent frame under --bank-sources all, --eval-only under torchrun,
the metrics of the saved weights under CPU DDP, the loader workers' draws after a resume, the overlay
set under DDP and the per-rank anchor cap."""
import json
import os
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

import cavp
import data
import tpavi

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixtures_layouts as fl  # noqa: E402
from script_runner import ENV, ROOT  # noqa: E402


@pytest.fixture(scope="module")
def ms3_root(tmp_path_factory):
    """AVSBench MS3 in the released layout whose test frame mt_3 shows no sounding object."""
    d = str(tmp_path_factory.mktemp("ms3"))
    fl.write_ms3(d, [("m1", "train"), ("mv", "val"), ("mt", "test")], h=24, w=36)
    Image.fromarray(np.zeros((24, 36), np.uint8)).save(
        os.path.join(d, "Multi-sources", "ms3_data", "gt_masks", "test", "mt", "mt_3.png"))
    return d


def test_bank_sources_all_leaves_a_silent_frame_mismatched(ms3_root):
    """--bank-sources all on an MS3 batch with an empty frame: no crash; the empty frame gets no bank
    audio (it has no class of its own), so its re-pair keeps the other frame's sounding clip and is
    labelled with that clip's classes and mismatched; the sounding frames get their own class."""
    frames = data.AVSBenchFrames(ms3_root, "ms3", "test", size=16)
    batch = data.pad_collate([frames[i] for i in range(5)])
    labels = cavp.gather_labels(batch)
    empty = [s["name"] for s in (frames[i] for i in range(5))].index("mt_3")
    assert labels.audio_classes[empty].sum() == 0
    bank = cavp.WaveBank(2, 1, 8, torch.device("cpu"))
    bank.push(torch.ones(1, 1, 8), torch.tensor([[0.0, 1.0]]), torch.tensor([0.5]))
    for seed in range(8):
        re = cavp.re_pair(labels, bank, 1.0, True, torch.Generator().manual_seed(seed), "all")
        t = labels.audio_classes
        assert (re.choice[empty] == -1).all()
        assert torch.equal(re.audio_classes[empty], t[re.perm[empty]])  # the other frame's clip
        assert not re.match[empty] and t[re.perm[empty]].sum() > 0
        for i in range(5):
            if i != empty:  # a sounding frame: matched, with its own clip or a bank clip of class 1
                assert re.match[i] and torch.equal(re.audio_classes[i], t[i])
                assert (re.choice[i, 1] == 1) == (t[re.perm[i]].sum() == 0)


# ------------------------------------------------------------------- run machinery, both scripts

SCRIPTS = ["cavp.py", "tpavi.py"]
RUN = ["--data", "vpo_msmi", "--workers", "0", "--batch-size", "4", "--limit", "8", "--no-amp",
       "--overlays", "2", "--log-every", "1"]


def launch(script, argv, ranks=1):
    """`python SCRIPT ARGV`, or torchrun with `ranks` gloo processes; asserts exit 0."""
    head = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                                f"--nproc_per_node={ranks}"] if ranks > 1 else [])
    proc = subprocess.run(head + [os.path.join(ROOT, script), *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module", params=SCRIPTS)
def ddp_run(request, tiny_vpo, tmp_path_factory):
    """A 2-rank CPU training run (2 steps, evaluated after them) and --eval-only of its last.pt on 3
    ranks (default --batch-size 16) and on 1 -> the script and the three run folders."""
    script, base = request.param, tmp_path_factory.mktemp(request.param.split(".")[0])
    out = {name: str(base / name) for name in ("train", "eval3", "eval1")}
    launch(script, RUN + ["--data-root", tiny_vpo, "--out", out["train"], "--epochs", "1",
                          "--max-iters", "2", "--eval-every", "1"], ranks=2)
    ckpt = os.path.join(out["train"], "last.pt")
    for name, ranks in (("eval3", 3), ("eval1", 1)):
        launch(script, ["--eval-only", "--ckpt", ckpt, "--data-root", tiny_vpo, "--out", out[name],
                        "--limit", "8", "--overlays", "2", "--workers", "0", "--no-amp"], ranks)
    return script, out


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_eval_only_on_three_ranks_takes_the_default_batch_size(ddp_run):
    """--eval-only never uses --batch-size: 3 ranks run it with a batch size (cavp.py: the default
    16; tpavi.py: the checkpoint's 4) that does not split over them."""
    _, out = ddp_run
    assert read_json(os.path.join(out["eval3"], "eval-real.json"))["args"]["batch_size"] % 3


def test_ddp_training_metrics_are_those_of_the_saved_weights(ddp_run):
    """On 2 CPU ranks (no SyncBatchNorm) the metrics logged during training are --eval-only's of the
    checkpoint written then, on 1 and on 3 ranks, up to the last digits of a pixel score that
    oneDNN computes with other kernels for another per-rank batch (a few pixels' argmax at a tie);
    each rank's own BatchNorm statistics move them by far more."""
    _, out = ddp_run
    logged = read_json(os.path.join(out["train"], "metrics.json"))["final"]
    for name in ("eval1", "eval3"):
        tested = read_json(os.path.join(out[name], "eval-real.json"))["eval"]
        numbers = [k for k, v in tested.items() if isinstance(v, float)]
        assert "miou" in numbers and "pixel_acc" in numbers
        for k in numbers:
            assert tested[k] == pytest.approx(logged[k], abs=1e-4, nan_ok=True), (name, k)


def test_overlays_do_not_depend_on_the_rank_count(ddp_run):
    """--overlays 2: the first two test images, on 1, 2 (training) or 3 ranks."""
    _, out = ddp_run
    sets = {name: sorted(os.listdir(os.path.join(d, "overlays"))) for name, d in out.items()}
    assert len(sets["eval1"]) == 2 and sets["train"] == sets["eval1"] == sets["eval3"], sets


class Draws(torch.utils.data.Dataset):
    """Stands in for the training set: each sample is a draw from torch's RNG, as augmentation is."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(image=torch.rand(3))


@pytest.mark.parametrize("script", [cavp, tpavi])
def test_resume_with_workers_draws_on(script):
    """A run resumed at epoch 1 with loader workers draws the augmentation of the uninterrupted run's
    epoch 1, not again that of epoch 0."""
    args = Namespace(workers=1, eval_batch_size=1, mono=True, seed=0, batch_size=4)

    def epochs(first, last):
        loader = script.build_loaders(args, dict(train=Draws()), [], 0, 1, torch.device("cpu"))[0]
        draws = []
        for epoch in range(first, last):
            loader.sampler.set_epoch(epoch)
            draws.append(torch.cat([b["image"] for b in loader]).sort(0)[0])
        return draws
    run, resumed = epochs(0, 2), epochs(1, 2)
    assert not torch.equal(run[0], run[1])
    assert torch.equal(resumed[0], run[1])



# ---------------------------------------------------- readings of the anchor cap and --pos-share


def random_pairs(seed, n=4, k=4, px=36):
    """n pairs then their n re-pairs: labels (2n, px) with some ignored pixels, audio sets, match."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (2 * n, px), generator=g)
    y[torch.rand(2 * n, px, generator=g) < 0.1] = 255
    t = (torch.rand(2 * n, k, generator=g) < 0.5).long()
    t[:, 0] = 0
    match = torch.cat([torch.ones(n, dtype=torch.bool), torch.rand(n, generator=g) < 0.5])
    return y, t, match


@pytest.mark.parametrize("mode", ["cavp", "supcon"])
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_anchor_cap_per_shard_against_a_loop(mode, shards):
    """--cap-shards: per shard of the batch (pair i and its re-pair in shard i // (n / shards)), every
    group gives min(cap, its size) sampled pixels, counted by a loop over the pixels."""
    cap, n = 3, 4
    for seed in range(4):
        y, t, match = random_pairs(seed, n)
        idx = cavp.plan_anchors(y, t, match, mode, cap, torch.Generator().manual_seed(seed),
                                positives="set", bg_groups="one", shards=shards)[0]
        fg, _, bg = cavp.anchor_sets(y, t, match)
        members = {}
        for p in range(2 * n):
            for q in range(y.shape[1]):
                label = int(y[p, q])
                if mode == "supcon":
                    group = None if label == 255 else (label if match[p] else 0)
                else:
                    group = (tuple(t[p].tolist()), label) if fg[p, q] else "bg" if bg[p, q] else None
                if group is not None:
                    members.setdefault((p % n // (n // shards), group), []).append(p * y.shape[1] + q)
        chosen = set(idx.tolist())
        assert len(chosen) == idx.numel()
        for where, pixels in members.items():
            assert len(chosen & set(pixels)) == min(cap, len(pixels)), (seed, where)
        assert chosen <= set().union(*members.values())


def test_pos_share_of_pairs_against_a_loop():
    """--pos-share-of pairs: bank audio for the mismatched re-pairs in the order of their draws until
    pos_share of all re-pairs match (a loop over the same draws); mismatched: each with
    probability pos_share (VPO-SS: most re-pairs mismatched, so about pos_share of them)."""
    b, k = 8, 5
    classes = torch.zeros(b, k)
    classes[torch.arange(b), torch.tensor([1, 1, 2, 2, 3, 3, 4, 4])] = 1
    pos = torch.full((b,), 0.5)
    labels = cavp.Labels(classes, pos, torch.where(classes > 0, 0.5, -1.0), torch.ones(b))
    bank = cavp.WaveBank(k, 1, 8, torch.device("cpu"))
    bank.push(torch.ones(4, 1, 8), classes[::2], pos[::2])
    for seed in range(10):
        for share in (0.25, 0.5, 0.9):
            re = cavp.re_pair(labels, bank, share, True, torch.Generator().manual_seed(seed),
                              share_of="pairs")
            g = torch.Generator().manual_seed(seed)
            perm, draws = cavp.derangement(b, g), torch.rand(b, generator=g)
            match = [bool((classes[perm[i]] == classes[i]).all()) for i in range(b)]
            for i in sorted((i for i in range(b) if not match[i]), key=lambda i: float(draws[i])):
                if sum(match) >= share * b:
                    break
                match[i] = True
            assert re.match.tolist() == match, (seed, share)
            banked = re.match & ~(classes[re.perm] == classes).all(1)  # matched by a bank clip
            assert torch.equal((re.choice >= 0).any(1), banked)
