"""Writers of tiny datasets in the released VPO / AVSBench layouts (cyh-0/CAVP's VPO release,
OpenNLPLab/AVSBench), for tests."""
import csv
import os

import numpy as np
from PIL import Image

from data import write_wav

H, W = 16, 24  # VPO fixture image size
# AVSS class id -> colour, derived by hand from the release's bit-spread palette (not from data.py)
AVSS_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 3: (128, 128, 0), 15: (192, 128, 128), 70: (32, 128, 128)}


def _save(img, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


def _rgb(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def dc_wav(path, level, seconds=3.0, rate=16000, channels=1):
    """A constant signal: makes panning / summation checks exact."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_wav(path, np.full((channels, int(seconds * rate)), level), rate)


def write_vpo(root, subset, samples):
    """samples: dicts with img (int), mask (uint8 of COCO ids, usually H x W), split, sources: list of
    (cateName, cateId, ann_Ids (int or list string), vgg_file, level, alpha), and optionally pixels (the
    image, uint8 of the mask's size; default random). Audio -> root/audio."""
    base = os.path.join(root, {"ss": "VPO-SS", "ms": "VPO-MS", "msmi": "VPO-MSMI"}[subset])
    rows = []
    for s in samples:
        image = Image.fromarray(s["pixels"]) if "pixels" in s else _rgb(*s["mask"].shape, s["img"])
        for cate_name, cate_id, ann_ids, vgg, level, alpha in s["sources"]:
            ann = int(str(ann_ids).strip("[]").split(",")[0])
            if subset == "ss":
                _save(image, os.path.join(base, "data", cate_name, f"{s['img']:012d}.jpg"))
                _save(Image.fromarray(s["mask"]),
                      os.path.join(base, "mask", cate_name, f"{s['img']:012d}_{ann:012d}.png"))
            dc_wav(os.path.join(root, "audio", f"{vgg}.wav"), level)
            row = dict(cateName=cate_name, img_Id=s["img"], ann_Ids=ann_ids, cateId=cate_id,
                       vgg_file=vgg, split=s["split"], audio_pos=alpha)
            if subset == "msmi":
                row["multi_instance"] = int(len(s["sources"]) > 1)
            rows.append(row)
        if subset != "ss":
            _save(image, os.path.join(base, "data", f"{s['img']:012d}.jpg"))
            _save(Image.fromarray(s["mask"]), os.path.join(base, "mask", f"{s['img']:012d}.png"))
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, f"vpo_{subset}_data_stereo.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return base


def _write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_s4(root, clips, h=20, w=30):
    """clips: (name, category, split). Released Single-source/ layout; S4 train has only mask 1.
    Foreground of every mask = the left third; gt PNGs alternate grey 'L' and RGB."""
    base = os.path.join(root, "Single-source")
    _write_csv(os.path.join(base, "s4_meta_data.csv"), ["name", "start", "category", "split"],
               [(n, 0, c, s) for n, c, s in clips])
    for k, (name, cat, split) in enumerate(clips):
        d = os.path.join(base, "s4_data")
        for i in range(1, 6):
            _save(_rgb(h, w, 10 * k + i), os.path.join(d, "visual_frames", split, cat, name, f"{name}_{i}.png"))
            if split != "train" or i == 1:
                m = np.zeros((h, w), np.uint8)
                m[:, : w // 3] = 255
                im = Image.fromarray(m) if i % 2 else Image.fromarray(np.stack([m, 0 * m, 0 * m], -1))
                _save(im, os.path.join(d, "gt_masks", split, cat, name, f"{name}_{i}.png"))
        dc_wav(os.path.join(d, "audio_wav", split, cat, f"{name}.wav"), 0.2, seconds=5, rate=8000, channels=2)
    return root


def write_ms3(root, clips, h=20, w=30):
    """clips: (name, split). Released Multi-sources/ layout; palette ('P') gt masks, right half on."""
    base = os.path.join(root, "Multi-sources")
    _write_csv(os.path.join(base, "ms3_meta_data.csv"), ["video_id", "split"], clips)
    d = os.path.join(base, "ms3_data")
    for k, (name, split) in enumerate(clips):
        for i in range(1, 6):
            _save(_rgb(h, w, 10 * k + i), os.path.join(d, "visual_frames", name, f"{name}.mp4_{i}.png"))
            m = Image.fromarray((np.arange(w)[None].repeat(h, 0) >= w // 2).astype(np.uint8), "P")
            m.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
            _save(m, os.path.join(d, "gt_masks", split, name, f"{name}_{i}.png"))
        dc_wav(os.path.join(d, "audio_wav", split, f"{name}.wav"), 0.1, seconds=5)
    return root


def write_avss(root, clips, h=12, w=18):
    """clips: (uid, label in v1s/v1m/v2, split, class_id in AVSS_COLOURS). AVSBench-semantic/
    layout; colour masks with class_id on the top half, background below; v1s train clips have
    only 0.png."""
    base = os.path.join(root, "AVSBench-semantic")
    _write_csv(os.path.join(base, "metadata.csv"), ["vid", "uid", "s_min", "s_sec", "a_obj", "split",
                                                    "label"],
               [(u, u, 0, 0, "x", s, lab) for u, lab, s, _ in clips])
    for k, (uid, label, split, cls) in enumerate(clips):
        clip = os.path.join(base, label, uid)
        n = 10 if label == "v2" else 5
        for i in range(n):
            _save(_rgb(h, w, 10 * k + i), os.path.join(clip, "frames", f"{i}.jpg"))
            if not (label == "v1s" and split == "train") or i == 0:
                rgb = np.zeros((h, w, 3), np.uint8)
                rgb[: h // 2] = AVSS_COLOURS[cls]
                _save(Image.fromarray(rgb), os.path.join(clip, "labels_rgb", f"{i}.png"))
        dc_wav(os.path.join(clip, "audio.wav"), 0.3, seconds=n)
    return base


def shown(sample):
    """A training sample's image as the step makes it from the source (data.window_images): float
    (3, h, w) in levels 0..255, the padding the mean colour 255 MEAN."""
    import data
    return data.window_images(sample["image"][None], sample["window"][None])[0]
