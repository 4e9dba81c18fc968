"""Loader speed: one worker's training samples against decoding their images alone.

Writes its own samples in the released layouts (VPO: cyh-0/CAVP's; AVSBench: OpenNLPLab/AVSBench's)
under --root (default: a temporary folder):
- VPO-MS: 640x480 photo-like JPEGs (smooth colour fields, 1/f texture, grain and 3-5 textured objects;
  quality 95, 4:2:0: ~175 KB, COCO's average ~160 KB), single-channel PNG masks of COCO ids, 1-5 sounding
  objects per image (one CSV row each, audio_pos = centre of mass at pixel centres / width as vpo_make.py),
  10 s clips alternately 44.1 kHz stereo and 16 kHz mono;
- AVSBench S4 (train): 5 RGB PNG frames per clip at 224x224 (the release's frame size), the first
  frame's binary mask, a 5 s clip (44.1 kHz stereo / 16 kHz mono alternately).
Then, in this process with one thread and data.worker_init (as a DataLoader worker of cavp.py /
tpavi.py; --malloc-defaults: without it), it times rounds over all samples, alternating: decoding
the images alone (PIL and torchvision.io, the faster counts) and producing the
training samples (VPODataset train=True at --crop; AVSBenchDataset train split at --size, T = 5). Times
are this process's CPU time (time.process_time), so other jobs on the machine slow them less than the
wall clock. It prints the median ms per sample of each, images/s, the ratio sample / decode, the
cost per image of collating a batch (--batch-size; AVSBench: a quarter, clips of 5 frames) into
shared memory as a DataLoader worker does, one worker's images/s with it, and the workers one GPU at
--gpu-rate images/s needs.

    OMP_NUM_THREADS=1 python benchmarks/loader.py --rounds 5
"""
import argparse
import cProfile
import csv
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torchvision
from PIL import Image

warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)  # torchvision.io, timed for comparison
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from vpo_make import png_bytes, put_bytes  # noqa: E402

W, H = 640, 480
CLIP_SECONDS = 10
RATES = ((44100, 2), (16000, 1))  # (sample rate, channels) of alternate clips


def _upsampled_noise(rng, h, w, cells, channels=1):
    """Smooth noise: a (cells x cells) grid of normals, bilinearly upsampled to (h, w)."""
    grid = torch.from_numpy(rng.normal(size=(1, channels, cells, cells)).astype(np.float32))
    up = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    return up[0].permute(1, 2, 0).numpy()


def photo(rng, h=H, w=W):
    """(h, w, 3) uint8 with a photograph's statistics: colour field, 1/f texture, 3-5 objects, grain;
    returns (image, the objects' visible pixels as (h, w) bool masks, those hidden by later ones left out)."""
    img = 0.45 + 0.25 * _upsampled_noise(rng, h, w, 3, 3)
    img += sum(_upsampled_noise(rng, h, w, c) * 0.6 / c ** 0.5 for c in (8, 24, 80, 240))
    yy, xx = np.mgrid[:h, :w] + 0.5
    objects = []
    for _ in range(rng.integers(3, 6)):
        cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.15 * h, 0.85 * h)
        rx, ry, th = rng.uniform(30, 140), rng.uniform(30, 120), rng.uniform(0, np.pi)
        u, v = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th), -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1
        stripes = np.sin(u / rng.uniform(2, 9)) * rng.uniform(0.05, 0.2)
        img[inside] = rng.uniform(0.1, 0.9, 3) + (stripes + 0.3 * _upsampled_noise(rng, h, w, 40)[..., 0])[inside, None]
        objects = [o & ~inside for o in objects] + [inside]
    img += rng.normal(0, 0.04, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), objects


def jpeg(path, pixels):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)  # PIL's default 4:2:0 subsampling, as most COCO images


def clip(path, rng, seconds, k):
    rate, channels = RATES[k % len(RATES)]
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + rng.normal(0, 0.05, (channels, t.size))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data.write_wav(path, x, rate)


def write_vpo(root, n, rng):
    """n VPO-MS train images with 1-5 sounding objects of distinct classes."""
    base, rows = os.path.join(root, "VPO-MS"), []
    for i in range(n):
        img_id = i + 1
        pixels, objects = photo(rng)
        jpeg(os.path.join(base, "data", f"{img_id:012d}.jpg"), pixels)
        objects = [o for o in objects if o.any()]
        k = int(rng.integers(1, min(5, len(objects)) + 1))
        cids = rng.choice(data.VPO_COCO_IDS, k, replace=False)
        mask = np.zeros((H, W), np.uint8)
        for obj, cid in zip(objects, cids):
            mask[obj] = cid
        for j, cid in enumerate(cids):
            xs = np.nonzero(mask == cid)[1]
            vgg = f"clip{img_id:04d}_{j}"
            clip(os.path.join(root, "audio", vgg + ".wav"), rng, CLIP_SECONDS, i + j)
            rows.append([data.VPO_CLASSES[data.VPO_COCO_IDS.index(cid) + 1], img_id, f"[{100 * img_id + j}]",
                         int(cid), vgg, "train", f"{(xs.mean() + 0.5) / W:.6f}"])
        put_bytes(os.path.join(base, "mask", f"{img_id:012d}.png"), png_bytes(mask))
    with open(os.path.join(base, "vpo_ms_data_stereo.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["cateName", "img_Id", "ann_Ids", "cateId", "vgg_file", "split", "audio_pos"]]
                                + rows)


def write_s4(root, n, rng, size=224):
    """n AVSBench S4 train clips (released Single-source/ layout)."""
    base = os.path.join(root, "Single-source")
    d = os.path.join(base, "s4_data")
    rows = []
    for i in range(n):
        name, cat = f"clip{i:04d}", "dog_barking"
        rows.append([name, 0, cat, "train"])
        for f in range(1, 6):
            pixels, objects = photo(rng, size, size)
            path = os.path.join(d, "visual_frames", "train", cat, name, f"{name}_{f}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(pixels).save(path)
            if f == 1:
                put_bytes(os.path.join(d, "gt_masks", "train", cat, name, f"{name}_1.png"),
                          png_bytes((objects[0] * 255).astype(np.uint8)))
        clip(os.path.join(d, "audio_wav", "train", cat, f"{name}.wav"), rng, 5, i)
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, "s4_meta_data.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["name", "start", "category", "split"]] + rows)


def decode_pil(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def decode_tv(path):
    return torchvision.io.decode_image(torchvision.io.read_file(path), torchvision.io.ImageReadMode.RGB)


def ms_per_item(fn, items):
    """CPU time of fn over items, ms per item."""
    t0 = time.process_time()
    for x in items:
        fn(x)
    return 1000 * (time.process_time() - t0) / len(items)


def collate_and_share(batch):
    """What a DataLoader worker does with a batch after the samples: pad_collate into shared memory,
    the trip to the main process (share_memory_ moves any tensor not there yet)."""
    for v in data.pad_collate(batch, shared=True).values():
        if torch.is_tensor(v):
            v.share_memory_()


def compare(name, images_per_sample, decode_paths, dataset, rounds, batch_size):
    """Alternating rounds of decoding the images alone (PIL, torchvision.io) and dataset[i]; then
    collate_and_share per image. Prints median ms per sample (per image for the collate), images/s
    and the ratio; returns the images/s of one worker (samples + collate)."""
    times = {"decode PIL": [], "decode torchvision.io": [], "sample": []}
    dataset[0]  # warm-up: imports, file cache
    for r in range(rounds):
        torch.manual_seed(r)
        times["decode PIL"].append(ms_per_item(lambda ps: [decode_pil(p) for p in ps], decode_paths))
        times["decode torchvision.io"].append(ms_per_item(lambda ps: [decode_tv(p) for p in ps], decode_paths))
        times["sample"].append(ms_per_item(dataset.__getitem__, range(len(dataset))))
    samples = [dataset[i] for i in range(len(dataset))]
    batches = [samples[i:i + batch_size] for i in range(0, len(samples) - batch_size + 1, batch_size)]
    per_image = batch_size * images_per_sample
    collate = statistics.median(ms_per_item(collate_and_share, batches) / per_image
                                for _ in range(rounds))
    med = {k: statistics.median(v) for k, v in times.items()}
    decode = min(med["decode PIL"], med["decode torchvision.io"])
    per_worker = 1000 * images_per_sample / (med["sample"] + collate * images_per_sample)
    print(f"{name}: {len(dataset)} samples x {rounds} rounds, one thread, CPU time")
    for k, v in med.items():
        print(f"  {k:22s} {v:7.2f} ms/sample  ({1000 * images_per_sample / v:6.1f} images/s)")
    print(f"  {'collate + share':22s} {collate:7.2f} ms/image   ({1000 / collate:6.1f} images/s)")
    print(f"  ratio sample / decode  {med['sample'] / decode:.2f}x (decode: the faster of the two)")
    print(f"  one worker (sample + collate + share): {per_worker:.1f} images/s")
    return per_worker


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="folder for the samples (default: a temporary folder)")
    p.add_argument("--n", type=int, default=24, help="VPO images / S4 clips written")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    p.add_argument("--crop", type=int, default=512, help="VPO training crop (CAVP App. B.1: 512)")
    p.add_argument("--size", type=int, default=224, help="AVSBench frame size (AVS: 224)")
    p.add_argument("--batch-size", type=int, default=16, help="batch collated by a worker (CAVP App. B.1: 16)")
    p.add_argument("--profile", action="store_true",
                   help="also print a cProfile (CPU time) of the VPO training samples, the 25 largest own times")
    p.add_argument("--gpu-rate", type=float, default=300.0,
                   help="training images/s of one GPU to feed (a few hundred at crop 512 on an "
                   "H100)")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="keep glibc's malloc settings (no data.worker_init)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if not args.malloc_defaults:
        data.worker_init()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        rng = np.random.default_rng(0)
        if not os.path.isfile(os.path.join(root, "VPO-MS", "vpo_ms_data_stereo.csv")):
            write_vpo(root, args.n, rng)
        if not os.path.isfile(os.path.join(root, "Single-source", "s4_meta_data.csv")):
            write_s4(root, args.n, rng, args.size)
        vpo = data.VPODataset(root, "ms", "train", train=True, crop=args.crop, pan="crop")  # the costlier pan
        sources = sum(len(s["sources"]) for s in vpo.samples) / len(vpo)
        kb = np.mean([os.path.getsize(s["image"]) for s in vpo.samples]) / 1024
        print(f"VPO-MS: {W}x{H} JPEGs ({kb:.0f} KB on average), {sources:.1f} sources per image, "
              f"{CLIP_SECONDS} s clips")
        rate = compare(f"VPODataset train, crop {args.crop}", 1, [[s["image"]] for s in vpo.samples], vpo,
                       args.rounds, args.batch_size)
        need = args.gpu_rate / rate
        print(f"workers for {args.gpu_rate:.0f} images/s: {need:.1f} -> {math.ceil(need)}")
        if args.profile:
            prof = cProfile.Profile(time.process_time)
            prof.runcall(lambda: [vpo[i] for i in range(len(vpo))])
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        s4 = data.AVSBenchDataset(root, "s4", "train", size=args.size)
        compare(f"AVSBenchDataset s4 train, size {args.size}, T = 5 (per clip of 5 frames)", 5,
                [s["frames"] for s in s4.samples], s4, args.rounds, args.batch_size // 4)


if __name__ == "__main__":
    main()
