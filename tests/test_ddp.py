"""cavp.py and tpavi.py under DDP: the global batch is one method on 1 or 2 gloo ranks, ranks draw
their own augmentation, one failing rank ends the run with its one line, and the bank never returns a sample's
own clip."""
import contextlib
import os
import subprocess
import time
from argparse import Namespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cavp
import data
import tpavi
from script_runner import ENV, command

ARGS = Namespace(backbone="resnet18", pretrained="none", output_stride=16, fusion="ca", attn="sigmoid", heads=4,
                 pos_enc="sine", audio_conv1="split", mono=False, contrast="cavp", seed=3, bank_size=4,
                 pos_share=1.0, bank_sources="single",
                 match="class", tau=0.1, anchors_per_group=24, positives="label", unknown="mismatched",
                 pos_share_of="mismatched", cap_shards=1,
                 bg_groups="one")


def global_batches(root):
    """Two fixed global batches of 4: single-source VPO-SS images (the bank stores their clips) and
    multi-source VPO-MSMI images, as the loader collates them."""
    ss, msmi = (data.VPODataset(root, subset, "train", crop=None) for subset in ("ss", "msmi"))
    return [data.pad_collate([ss[i], ss[i + 1], msmi[i], msmi[i + 1]]) for i in (0, 2)]


def save_step(rank, world, loss, parts, model, path, **extra):
    """Backward; rank 0 saves the global loss and its parts (averaged over the ranks) and the gradients that
    DDP averaged."""
    loss.backward()
    values = torch.stack([loss.detach(), *(v.detach() for v in parts.values())])
    if world > 1:
        dist.all_reduce(values)
        values /= world
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save(dict(values=values, grads=grads, **extra), path)


def cavp_step(rank, world, batches, mode, path):
    """cavp.Criterion on this rank's share of batches[0] (epoch 0: fills the bank) and batches[1] (epoch 1:
    bank re-pairs), then backward through DDP. BatchNorm uses running statistics: gloo ranks have no
    SyncBatchNorm."""
    torch.manual_seed(0)
    model = cavp.CAVPModel(ARGS, len(data.VPO_CLASSES)).eval()
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    criterion = cavp.Criterion(Namespace(**dict(vars(ARGS), contrast=mode)), len(data.VPO_CLASSES),
                               data.LogMel(frames=300), torch.device("cpu"), False, rank, world)
    b = 4 // world
    mine = [{k: v[rank * b:(rank + 1) * b] for k, v in batch.items()} for batch in batches]
    with torch.no_grad():
        criterion(net, mine[0], 0)
    loss, parts = criterion(net, mine[1], 1)
    save_step(rank, world, loss, parts, model, path, bank=criterion.bank.count.clone())


def tpavi_step(rank, world, task, path):
    """tpavi.Criterion on this rank's half of a fixed global batch of 4 clips (T = 2; labelled frames and
    ignore pixels differ between the halves), then backward through DDP."""
    torch.manual_seed(0)
    classes = 1 if task == "avsbench_ms3" else 5
    g = torch.Generator().manual_seed(1)
    mask = torch.randint(0, 2 if classes == 1 else classes, (4, 2, 32, 32), generator=g)
    mask[0, 1], mask[1, :, :8], mask[3, 0, 16:] = 255, 255, 255  # unlabelled frame, ignore regions
    batch = dict(image=torch.randn(4, 2, 3, 32, 32, generator=g), mask=mask,
                 wave=torch.randn(4, 1, 2 * 16000, generator=g), valid=torch.ones(4, 2, dtype=torch.bool))
    model = tpavi.AVSModel("resnet18", "none", classes, [0, 1, 2, 3], "resnet18", 1).eval()
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    criterion = tpavi.Criterion(Namespace(lambda_avm=0.5, tpavi_stages=[0, 1, 2, 3], data=task), classes == 1,
                                torch.device("cpu"), False, world)
    b = 4 // world
    loss, parts = criterion(net, {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}, 0)
    save_step(rank, world, loss, parts, model, path)


CASES = ["cavp", "supcon", "tpavi-avsbench_ms3", "tpavi-avss"]


def all_steps(rank, world, batches, out):
    """Rank `rank` of `world` (gloo) runs every case, saving OUT/<case>-w<world>.pt."""
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for case in CASES:
        path = f"{out}/{case}-w{world}.pt"
        if case.startswith("tpavi"):
            tpavi_step(rank, world, case.split("-")[1], path)
        else:
            cavp_step(rank, world, batches, case, path)
    if world > 1:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tiny_vpo, tmp_path_factory):
    """Every case once on 1 rank (this process) and once on 2 gloo ranks (one spawn)."""
    out = tmp_path_factory.mktemp("ddp")
    batches = global_batches(tiny_vpo)
    all_steps(0, 1, batches, out)
    mp.spawn(all_steps, args=(2, batches, out), nprocs=2)
    return out


@pytest.mark.parametrize("case", CASES)
def test_one_rank_equals_two_ranks(ddp_runs, case):
    """Same global batch, same draws: the loss, its parts and every gradient on 2 gloo ranks == on 1 rank
    (cavp.py with CAVP mining and with SupCon; tpavi.py's BCE / CE + lambda L_AVM)."""
    one, two = (torch.load(ddp_runs / f"{case}-w{w}.pt", weights_only=True) for w in (1, 2))
    torch.testing.assert_close(two["values"], one["values"], rtol=1e-5, atol=1e-6)
    assert one["values"][2] > 0 and len(one["grads"]) > 50 and one["grads"].keys() == two["grads"].keys()
    if "bank" in one:
        assert torch.equal(one["bank"], two["bank"]) and one["bank"].sum() == 4
    for name, grad in one["grads"].items():  # float32 sums in another order: ~1e-4 of the norm at most
        error = (two["grads"][name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert error < 1e-3, (name, float(error))


def single_source_batch(seed):
    """4 single-source images of 16 x 16 px: two of class 1, two of class 2, distinct random clips."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.zeros(4, 22)
    classes[[0, 1], 1], classes[[2, 3], 2] = 1, 1
    mask = torch.zeros(4, 16, 16, dtype=torch.long)
    mask[:, 4:12, 4:12] = torch.tensor([1, 1, 2, 2])[:, None, None]
    pos = torch.tensor([0.2, 0.7, 0.4, 0.9])
    return dict(image=torch.randn(4, 3, 16, 16, generator=g), mask=mask, wave=torch.randn(4, 2, 48000, generator=g),
                audio_classes=classes, audio_pos=pos, source_pos=torch.where(classes > 0, pos[:, None], -1.0))


def test_bank_is_filled_after_the_repairs():
    """App. B with a derangement: no re-pair gets its image's own clip in the step that reads it, not from
    the batch and not from the bank (the bank takes the batch's clips after the re-pairs and bank draws);
    a replaced re-pair gets a clip of its image's class stored by an earlier step."""
    seen = []

    def net(image, mel, pairing, plan):
        clips = cavp.pair_embeddings(mel.flatten(1), pairing)  # the 2b "embeddings" are the clips themselves
        seen.append(clips.view(-1, *mel.shape[1:]))
        plan(4, 4)
        return torch.zeros(image.shape[0], 22, *image.shape[2:]), torch.randn(clips.shape[0], 8, 4, 4), None
    replaced = 0
    for seed in range(6):
        args = Namespace(**dict(vars(ARGS), seed=seed, bank_size=1))
        criterion = cavp.Criterion(args, 22, lambda w: w.clone(), torch.device("cpu"), False, 0, 1)
        older, batch = single_source_batch(2 * seed), single_source_batch(2 * seed + 1)
        criterion(net, older, 1)  # bank: class 1 <- clip 1, class 2 <- clip 3 of `older`
        criterion(net, batch, 1)
        repaired = seen[-1][4:]
        for i in range(4):
            assert not torch.allclose(repaired[i], batch["wave"][i])
            if not any(torch.equal(repaired[i], w) for w in batch["wave"]):  # a bank clip, panned at pos[i]
                a, last = batch["audio_pos"][i], older["wave"][1 if i < 2 else 3].sum(0)
                torch.testing.assert_close(repaired[i], torch.stack([(1 - a) * last, a * last]))
                replaced += 1
    assert replaced > 0


class Draws(torch.utils.data.Dataset):
    """Stands in for the training set: each sample is a draw from torch's RNG, as the augmentation draws."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return dict(image=torch.rand(3))


@pytest.mark.parametrize("workers", [0, 1])
def test_ranks_draw_their_own_augmentation(workers):
    """Two ranks of one run draw different augmentations for their first batch (with --workers 0 from
    the global RNG that main() seeds per rank); the same rank of the same seed draws the same again."""
    args = Namespace(workers=workers, eval_batch_size=1, mono=True, seed=0, batch_size=4)

    def first_batch(rank):
        cavp.seed_all(cavp.rank_seed(args.seed, rank))
        loader = cavp.build_loaders(args, dict(train=Draws()), [], rank, 2, torch.device("cpu"))[0]
        loader.sampler.set_epoch(0)
        return next(iter(loader))["image"]
    r0, r1, again = first_batch(0), first_batch(1), first_batch(0)
    assert torch.equal(r0, again)
    assert not torch.isclose(r0, r1).any()


def test_a_failing_rank_ends_the_run_with_its_line(tiny_vpo, tmp_path):
    """torchrun, 2 gloo ranks, a corrupt JPEG read by one rank: the run ends within seconds; the ranks print
    that one line and no traceback; torchrun's report names the failing rank with the same line."""
    root = tmp_path / "vpo"
    subprocess.run(["cp", "-r", tiny_vpo, root], check=True)
    bad = root / "VPO-MSMI" / "data" / sorted(os.listdir(root / "VPO-MSMI" / "data"))[0]
    bad.write_bytes(b"not a jpeg")
    argv = ["--data", "vpo_msmi", "--data-root", root, "--out", tmp_path / "run", "--workers", "0",
            "--batch-size", "4", "--epochs", "2", "--overlays", "0"]
    start = time.time()
    proc = subprocess.run(command("cavp.py", argv, torchrun=True), env=ENV, capture_output=True, text=True,
                          timeout=300)
    took = time.time() - start
    assert proc.returncode != 0
    line = f"error: {bad}: cannot read image"
    lines = proc.stderr.splitlines()
    assert [ln for ln in lines if ln.startswith("error:")][0].startswith(line)
    assert not any(ln.startswith("[rank") or "cavp.py\", line" in ln for ln in lines), proc.stderr[-3000:]
    root_cause = proc.stderr.split("Root Cause")[1]
    assert line in root_cause and "exitcode  : 2" in root_cause
    assert took < 60, f"took {took:.0f} s"


def test_training_steps_never_wait_for_the_device(tiny_vpo, monkeypatch):
    """The whole training step (Eq. 1 re-pairs with bank clips, Eq. 2-4 anchors, CE, backward, SGD) runs with
    every device tensor on PyTorch's meta device, which holds no values: any read-back (.item(), .tolist(),
    nonzero, boolean indexing, `if tensor`) would raise. So on a GPU the host never waits for the device
    inside a step; the meter reads back once per log line. Same for tpavi.py's step."""
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())  # no autocast on meta
    meta = torch.device("meta")
    model = cavp.CAVPModel(ARGS, 22).to(meta)
    criterion = cavp.Criterion(ARGS, 22, data.LogMel(frames=300).to(meta), meta, False, 0, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    meter = cavp.Meter(0, 10, 1, 0.0)
    for step, batch in enumerate(global_batches(tiny_vpo) * 2):
        loss, parts = criterion(model, batch, step // 2)  # epoch 1 from step 2: the bank is used
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        meter.update(loss, parts, 4, 0.1, step + 1)
    assert loss.device == meta and criterion.bank.count.sum() == 8
    with pytest.raises(NotImplementedError):
        meter.line(0, 1, 4, 0.1)  # the log line is where values come back
    model = tpavi.AVSModel("resnet18", "none", 5, [0, 1, 2, 3], "resnet18", 1).to(meta)
    criterion = tpavi.Criterion(Namespace(lambda_avm=0.5, tpavi_stages=[0, 1, 2, 3], data="avss"), False, meta,
                                False, 1)
    batch = dict(image=torch.randn(2, 2, 3, 32, 32), mask=torch.randint(0, 5, (2, 2, 32, 32)),
                 wave=torch.randn(2, 1, 32000), valid=torch.ones(2, 2, dtype=torch.bool))
    loss, parts = criterion(model, batch, 0)
    loss.backward()
    assert loss.device == meta
