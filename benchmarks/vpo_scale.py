"""Cost of vpo_make.py's planning as its input grows, and the projection to full COCO 2017.

For each N in --sizes, writes annotation-only COCO 2017 sources for N images (instances and captions
JSON, split 96/4 like train2017/val2017; ~7.3 instances per image drawn with COCO's approximate
category shares, one polygon of 8-40 vertices each, 1 % crowd regions as uncompressed RLE; five
captions per image; empty image files) and a VGGSound root with --clips 0.25 s WAV clips of Table 7
labels, then runs the builder's planning (vpo_make.prepare: reading both sources, the person rule,
sampling at the paper's sizes) in a fresh process and reports wall time and peak RSS. `--write N
...` also times whole builds (planning + masks + links, 1 worker) on N images, whose masks are
COCO-sized (640x480).

    python benchmarks/vpo_scale.py --sizes 1000 4000 16000 32000 --write 1000 4000
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import vpo_make  # noqa: E402
from data import VPO_AUDIO_LABELS  # noqa: E402

COCO_IMAGES = 123287  # COCO 2017 train + val
PAPER_SAMPLES = sum(sum(v) for v in vpo_make.PAPER_SIZES.values())
PERSON_SHARE, VPO_SHARE = 0.30, 0.19  # approximate shares of COCO instances; the rest: 59 other classes
WORDS = ("a man", "a woman", "a girl", "a boy", "a baby", "people", "a person", "two men")


def coco_categories():
    """COCO-like category list: person (1), the 18 VPO object classes and 59 others."""
    vpo = [(cid, name) for name, cid in vpo_make.CLASS_ID.items() if name not in vpo_make.PERSONS]
    used = {cid for cid, _ in vpo} | {1}
    others = [(cid, f"other{cid}") for cid in range(2, 91) if cid not in used][:59]
    return [(1, "person")] + vpo + others


def synth_split(rng, first_id, n, cats, ann_id):
    """(instances dict, captions dict, next ann id) of n annotation-only images."""
    ids = np.array([c for c, _ in cats])
    share = np.r_[PERSON_SHARE, np.full(len(cats) - 60, VPO_SHARE / (len(cats) - 60)),
                  np.full(59, (1 - PERSON_SHARE - VPO_SHARE) / 59)]
    images, anns, caps = [], [], []
    for img_id in range(first_id, first_id + n):
        w, h = (640, 480) if rng.random() < 0.7 else (480, 640)
        images.append(dict(id=img_id, file_name=f"{img_id:012d}.jpg", height=h, width=w))
        themes = rng.choice(ids, 1 + rng.poisson(1.5), p=share)
        for cid in themes[rng.integers(len(themes), size=1 + rng.poisson(6.3))]:
            ann_id += 1
            x0, y0 = rng.uniform(0, w - 60), rng.uniform(0, h - 60)
            bw, bh = rng.uniform(10, min(300, w - x0)), rng.uniform(10, min(300, h - y0))
            crowd = int(rng.random() < 0.01)
            if crowd:
                runs = rng.integers(1, 400, 2 * rng.integers(20, 200)).tolist()
                seg = {"size": [h, w], "counts": runs + [h * w - sum(runs)]}  # runs cover the image
            else:
                pts = rng.uniform(0, 1, (rng.integers(8, 41), 2)) * (bw, bh) + (x0, y0)
                seg = [np.round(pts.ravel(), 2).tolist()]
            anns.append(dict(id=ann_id, image_id=img_id, category_id=int(cid), iscrowd=crowd, segmentation=seg,
                             area=float(bw * bh / 2), bbox=[round(x0, 2), round(y0, 2), round(bw, 2), round(bh, 2)]))
        caps += [dict(id=img_id * 10 + j, image_id=img_id,
                      caption=f"{WORDS[rng.integers(len(WORDS))]} standing next to something in a room")
                 for j in range(5)]
    categories = [dict(id=c, name=name, supercategory="x") for c, name in cats]
    return (dict(images=images, annotations=anns, categories=categories),
            dict(images=images, annotations=caps), ann_id)


def write_sources(root, n, clips, seed=0):
    """COCO root (annotations + empty image files) for n images and VGGSound root with `clips` clips
    of Table 7 labels; returns both roots and the number of instances."""
    rng, cats = np.random.default_rng(seed), coco_categories()
    coco, vgg = os.path.join(root, "coco"), os.path.join(root, "vggsound")
    n_val = max(1, round(n * 5000 / COCO_IMAGES))
    ann_id, first = 0, 1
    for (_, folder, _), count in zip(vpo_make.SPLITS, (n - n_val, n_val)):
        inst, caps, ann_id = synth_split(rng, first, count, cats, ann_id)
        first += count
        os.makedirs(os.path.join(coco, folder), exist_ok=True)
        for info in inst["images"]:
            open(os.path.join(coco, folder, info["file_name"]), "wb").close()
        os.makedirs(os.path.join(coco, "annotations"), exist_ok=True)
        for kind, data in (("instances", inst), ("captions", caps)):
            with open(os.path.join(coco, "annotations", f"{kind}_{folder}.json"), "w") as f:
                json.dump(data, f)
    labels, rows = [lab for labs in VPO_AUDIO_LABELS.values() for lab in labs], []
    for i in range(clips):
        rows.append([f"yt{i:07d}", 0, labels[i % len(labels)], ("train", "test")[i // len(labels) % 2]])
        vpo_make.put_wav(os.path.join(vgg, "audio", f"yt{i:07d}_000000.wav"), np.zeros(4000), 16000)
    with open(os.path.join(vgg, "vggsound.csv"), "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return coco, vgg, ann_id


def peak_rss_mb():
    """Peak RSS of this process: VmHWM (getrusage's ru_maxrss counts the parent's RSS at fork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def measure(coco, vgg, out):
    """In this process: planning (and, with `out`, the whole build); prints one JSON line."""
    base, t0 = peak_rss_mb(), time.perf_counter()
    if out:
        summary = vpo_make.build(coco, vgg, out, workers=1)
        samples = sum(e[sp]["samples"] for e in summary["subsets"].values() for sp in ("train", "val"))
    else:
        subsets = vpo_make.prepare(coco, vgg, vpo_make.PAPER_SIZES, vpo_make.PAPER_MI_SHARE, 0, False)[0]
        samples = sum(map(len, subsets.values()))
    print(json.dumps(dict(seconds=time.perf_counter() - t0, rss_mb=peak_rss_mb(), base_mb=base,
                          samples=samples)))


def run(coco, vgg, out=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", coco, vgg] + (["--out", out] if out else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000, 32000],
                   help="numbers of COCO images to plan from")
    p.add_argument("--clips", type=int, default=80, help="VGGSound clips of Table 7 labels (0.25 s WAVs)")
    p.add_argument("--write", type=int, nargs="*", default=[], help="also time whole builds on these numbers "
                   "of images")
    p.add_argument("--measure", nargs=2, metavar=("COCO", "VGG"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return measure(*args.measure, args.out)
    print(f"{'images':>7}{'instances':>10}{'clips':>7}{'samples':>8}{'time s':>8}{'s/1k img':>9}"
          f"{'peak MB':>8}{'MB/1k img':>10}", flush=True)
    points = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            coco, vgg, n_ann = write_sources(tmp, n, args.clips)
            r = run(coco, vgg)
        grown = r["rss_mb"] - r["base_mb"]
        points.append((n, r["seconds"], grown, r["base_mb"]))
        print(f"{n:7d}{n_ann:10d}{args.clips:7d}{r['samples']:8d}{r['seconds']:8.2f}{1000 * r['seconds'] / n:9.3f}"
              f"{r['rss_mb']:8.0f}{1000 * grown / n:10.2f}", flush=True)
    if len(points) > 1:
        (n0, t0, m0, _), (n1, t1, m1, base) = points[-2], points[-1]
        dt, dm = (t1 - t0) / (n1 - n0), (m1 - m0) / (n1 - n0)
        print(f"marginal per 1k images ({n0}->{n1}): {1000 * dt:.3f} s, {1000 * dm:.1f} MB; projected at "
              f"{COCO_IMAGES} images: {t1 + dt * (COCO_IMAGES - n1):.0f} s, "
              f"{base + m1 + dm * (COCO_IMAGES - n1):.0f} MB peak RSS")
    for n in args.write:
        with tempfile.TemporaryDirectory() as tmp:
            coco, vgg, _ = write_sources(tmp, n, args.clips)
            r = run(coco, vgg, os.path.join(tmp, "out"))
        per_sample = r["seconds"] / r["samples"]
        print(f"whole build on {n} images (1 worker): {r['samples']} samples in {r['seconds']:.1f} s = "
              f"{1000 * per_sample:.1f} ms per sample, peak {r['rss_mb']:.0f} MB; at the paper's {PAPER_SAMPLES} "
              f"samples: {per_sample * PAPER_SAMPLES:.0f} s", flush=True)


if __name__ == "__main__":
    main()
