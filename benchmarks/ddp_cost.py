"""What the global-batch semantics of cavp.py cost per training step.

  python benchmarks/ddp_cost.py                 # built-in 64 px VPO-MSMI, batch 8: 1 rank vs 2 gloo ranks
  python benchmarks/ddp_cost.py --paper-plan    # + the host plan alone at the paper's size (16 x 512 px)

Prints, per step: the wall time, the time inside the exchanges between ranks (labels on the host, clips and
sampled anchor features on the device; cavp.gather and its backward), and the host plan (re-pairs, bank,
anchor sets and sampling: cavp.re_pair + cavp.plan_anchors) at the paper's batch 16 and 512 px crops.
"""
import argparse
import os
import sys
import time
from argparse import Namespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cavp  # noqa: E402
import data  # noqa: E402

ARGS = dict(backbone="resnet18", pretrained="none", output_stride=16, fusion="ca", attn="sigmoid", heads=4, mono=False,
            pos_enc="sine", audio_conv1="split",
            contrast="cavp", seed=0, bank_size=8, pos_share=0.5, bank_sources="single", match="class", tau=0.1,
            anchors_per_group=128, positives="label", unknown="mismatched", bg_groups="one")


def steps(rank, world, root, batch_size, iters, out):
    """Train `iters` steps on this rank's share of fixed global batches; rank 0 writes its timings."""
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    args = Namespace(**ARGS)
    ds = data.VPODataset(root, "msmi", "train", crop=None)
    batches = [data.pad_collate([ds[(i * batch_size + j) % len(ds)] for j in range(batch_size)]) for i in range(4)]
    model = cavp.CAVPModel(args, len(data.VPO_CLASSES))
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    criterion = cavp.Criterion(args, len(data.VPO_CLASSES), data.LogMel(frames=300), torch.device("cpu"), False,
                               rank, world)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    spent = [0.0]
    real_gather = cavp.gather

    def timed_gather(x, group=None):
        t = time.perf_counter()
        y = real_gather(x, group)
        spent[0] += time.perf_counter() - t
        return y
    cavp.gather = timed_gather
    b = batch_size // world
    times = []
    for it in range(iters):
        batch = {k: v[rank * b:(rank + 1) * b] if torch.is_tensor(v) else v for k, v in batches[it % 4].items()}
        t = time.perf_counter()
        loss, _ = criterion(net, batch, 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    if rank == 0:
        torch.save(dict(step=sorted(times[2:])[len(times[2:]) // 2], gather=spent[0] / iters), out)
    if world > 1:
        dist.destroy_process_group()


def paper_plan(repeats=5):
    """Median seconds of the host plan for a global batch of 16 at crop 512 (z at 128 x 128, 22 classes)."""
    g = torch.Generator().manual_seed(0)
    b, k, side = 16, len(data.VPO_CLASSES), 128
    t = torch.zeros(b, k)
    for i in range(b):
        t[i, torch.randint(1, k, (torch.randint(1, 4, ()).item(),), generator=g)] = 1
    y = torch.zeros(b, side, side, dtype=torch.long)
    for i in range(b):  # a rectangle per sounding class, some background
        for c in torch.nonzero(t[i]).flatten().tolist():
            y0, x0 = torch.randint(0, side // 2, (2,), generator=g).tolist()
            y[i, y0:y0 + side // 3, x0:x0 + side // 3] = c
    labels = cavp.Labels(t, torch.full((b,), -1.0), torch.where(t > 0, 0.5, -1.0), None)
    bank = cavp.WaveBank(k, 8, 16, "cpu")
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        perm, choice, t_re, match, wrong_side = cavp.re_pair(labels, bank, 0.5, True, g)
        cavp.plan_anchors(torch.cat([y, y]).flatten(1), torch.cat([t, t_re]).long(),
                          torch.cat([torch.ones(b, dtype=torch.bool), match]), "cavp", 512, g, "label",
                          "mismatched", "one", torch.cat([torch.zeros_like(wrong_side), wrong_side]))
        out.append(time.perf_counter() - start)
    return sorted(out)[len(out) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data", help="built-in VPO (python vpo_make.py --synthetic --out data)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch")
    p.add_argument("--iters", type=int, default=12, help="steps per setting (the first two are left out)")
    p.add_argument("--paper-plan", action="store_true", help="also time the host plan at the paper's size")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = f"/tmp/ddp_cost_{os.getpid()}"
    res = {}
    for world in (1, 2):
        if world == 1:
            steps(0, 1, args.data_root, args.batch_size, args.iters, out)
        else:
            mp.spawn(steps, args=(world, args.data_root, args.batch_size, args.iters, out), nprocs=world)
        res[world] = torch.load(out, weights_only=True)
        print(f"{world} rank(s), global batch {args.batch_size}: {1000 * res[world]['step']:.0f} ms/step, "
              f"{1000 * res[world]['gather']:.1f} ms/step exchanging labels, clips and anchor features (forward)")
    if args.paper_plan:
        print(f"host plan (Eq. 1-3: re-pairs, bank, anchor sets, sampling) at batch 16 x 512 px: "
              f"{1000 * paper_plan():.0f} ms/step on one thread")


if __name__ == "__main__":
    main()
