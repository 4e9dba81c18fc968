"""Build the VPO audio-visual segmentation benchmarks (CAVP, CVPR 2024, Sec. 3 and App. A).

Real mode
    python vpo_make.py --coco COCO_ROOT --vggsound VGG_ROOT --out DATA_ROOT
reads COCO 2017 (COCO_ROOT/annotations/{instances,captions}_{train,val}2017.json, images
COCO_ROOT/{train,val}2017/*.jpg, masks decoded by pycocotools) and VGGSound (VGG_ROOT/vggsound.csv,
rows `youtube_id,start_seconds,label,split`; clips VGG_ROOT/audio/{vgg_file}.wav with
vgg_file = f"{youtube_id}_{start_seconds:06d}") and writes VPO-SS, VPO-MS and VPO-MSMI in the
layout of cyh-0/CAVP's VPO release that data.VPODataset reads:
    DATA_ROOT/VPO-{SS,MS,MSMI}/vpo_{ss,ms,msmi}_data_stereo.csv, data/, mask/
    DATA_ROOT/audio/{vgg_file}.wav       (hard link to the VGGSound clip, copy across devices)
    DATA_ROOT/vpo_summary.json           (sizes, per-class counts, imbalance N_max/N_min, App. A.1,
                                          and under "missing" what the inputs lacked)

Partial inputs (real copies are never complete) build; each gap is one `warning:` line on stderr
and is listed in vpo_summary.json and the printed summary:
- a listed VGGSound clip that is not on disk, is there only in another format ({vgg_file}.flac,
  .mp4, ...: the warning gives the ffmpeg loop that writes 16 kHz 16-bit PCM WAVs next to them) or
  is no WAV that data.read_wav reads (PCM or float) is skipped and counted;
- a Table 7 label without a usable clip: its class draws from its other labels. A class without
  any clip cannot sound: its objects and crowd regions are background, never sources (like
  ambiguous persons); the warning names the class and the number of images affected;
- a COCO image listed in the annotations but not on disk is skipped; a missing train2017/ or
  val2017/ folder skips that VPO split without reading its annotations (a root with only val2017
  builds the val (test) split alone). --strict makes both errors;
- vggsound.csv with a header row (its second field is not an integer) or extra columns (the
  published file has neither) is read with a `note:` line; a header naming the columns (e.g.
  `youtube_id,start_seconds,label,split` or `# YouTube ID,start seconds,label,train/test split`)
  places them, otherwise the first four columns are used.
The build stops with `error: ...` (exit 2) only when nothing can be built: no usable clip of any
Table 7 label, neither image folder, or no image on disk with an object of a class that has clips.

AVS-M-SS mode (CAVP Sec. 5.2: does TPAVI score the same when AVSBench S4's audio comes from VGGSound?)
    python vpo_make.py --avs-mss --avsbench AVSBENCH_ROOT --vggsound VGG_ROOT --out DIR
writes AVSBench-Objects S4 in its own layout to DIR/Single-source/ (s4_meta_data.csv copied; frames, masks
and clips hard-linked) with each clip's audio_wav/{split}/{category}/{name}.wav replaced by a VGGSound clip
of the clip's category, drawn per clip from a seeded RNG out of the VGGSound split that matches the S4 split
(train -> train, val and test -> test; all the category's clips where that split has none). The S4
categories are VGGSound labels written with '_' for ' '; male_speech, playing_violin and race_car name the
VGGSound labels 'male speech, man speaking', 'playing violin, fiddle' and 'race car, auto racing'
(S4_VGGSOUND). The readers take 1 s per frame from the start of the clip (the first 5 s of a 10 s
VGGSound clip). VGGSound is read as in real mode, with its partial-input rules; a category without any
usable clip keeps its AVSBench audio (a warning, counted in the summary). Precomputed VGGish log-mels
(audio_log_mel/) describe the original audio and are not written. DIR/avs_mss_audio.csv lists the clip
chosen for every S4 clip, DIR/avs_mss_summary.json the counts. `tpavi.py --data avsbench_s4 --data-root DIR`
trains on it.

Built-in mode
    python vpo_make.py --synthetic --out DATA_ROOT
first writes synthetic *sources* in the COCO / VGGSound formats under DATA_ROOT/sources/{coco,
vggsound} (instances JSON with polygon and compressed-RLE masks, captions JSON, vggsound.csv and
3 s 16 kHz mono WAVs), then runs the same builder on them. The world needs audio and stereo:
- each of the 21 classes has a visual family (unique shape x texture, hue k/21; per-instance size,
  rotation and colour jitter) on cluttered backgrounds (gradient, noise, dull lines and elongated
  blobs of no class); 3-5 classes per image, objects never overlap;
- each class has a sound family (pitch, harmonic count, pulse rate, noise band; per-clip jitter,
  background noise); 12 train / 4 test clips per class, every Table 7 label has clips;
- the builder's silencing leaves visible objects mute, so the image alone cannot tell what to
  segment; multi-instance images repeat one class, one instance centred in the left and one in
  the right 30 % of the width, and only one of them sounds: stereo is the only cue;
- persons are drawn as male/female/baby families with matching captions ("a man", "two women",
  "a toddler"), or ambiguous ones (neutral "a person", or two genders in one image);
- defaults: 64x64 images, 128 train / 300 test samples per subset, --mi-share 0.5. The stereo
  probe (benchmarks/stereo_probe.sh), `--mi-share 1 --mi-single-source`: every VPO-MSMI sample
  is a multi-instance image sounding through one of its twins only (without the second flag:
  plus other classes).

Documented choices (the paper leaves them open):
- Split: COCO train2017 -> VPO "train", val2017 -> "val" (= test). Audio for a train sample comes
  from VGGSound "train" clips, for a val sample from "test" clips (a class without clips in that
  split uses all its clips). A clip is drawn uniformly among the usable clips of the class's Table 7
  labels.
- Persons: COCO has one "person" class, VPO has male/female/baby (ids 92/93/94). All persons of an
  image get one class from its captions (`person_class`): man/men/boy/guy/male/gentleman/... ->
  male; woman/women/girl/lady/female/... -> female; baby/infant/toddler -> baby ("baby" followed
  by an animal, e.g. "baby elephant", does not count). Captions naming none or more than one of
  these groups -> ambiguous: those persons are never sound sources (background in the masks).
- Objects are the non-crowd instances of VPO classes. Crowd regions (iscrowd=1) are never sources.
  An image is single-instance when each VPO class in it has exactly one object and it has no
  crowd region of a VPO class; only such images enter VPO-SS and VPO-MS ("no two instances of one
  class", Sec. 3). Images where a class has several objects (or an object plus a crowd region) are
  multi-instance and enter VPO-MSMI only.
- Priority: candidates are taken in order of decreasing number of distinct VPO classes (Sec. 3:
  multi-class images first), ties broken by a seeded random key.
- VPO-SS: one random class of the image sounds (its single object). VPO-MS: in images with more than
  two objects, k ~ U{1..min(5, n-1)} random objects sound and the rest are silenced; otherwise all
  sound. VPO-MSMI = multi-instance images (multi_instance=1; a share --mi-share of the subset,
  capped by the images available) + the first VPO-MS samples for the rest (same rows,
  multi_instance=0). In a multi-instance image one random repeated class sounds through ONE instance
  (its twins stay silent, so stereo is the only cue), plus k-1 other classes, k ~ U{1..min(5,
  classes)} (--mi-single-source: k = 1). Every sounding class has exactly one sounding object: one CSV row per source.
- Masks: single-channel PNG, pixel = COCO id of a sounding object, 0 background (silent objects
  included), 255 = crowd regions of a sounding class (may contain the source; ignored).
- audio_pos = centre of mass of the sounding object's mask, x measured at pixel centres, / width
  (so a horizontal flip maps it to 1 - audio_pos exactly).
- Sizes default to the paper's (SS 11,312/890, MS 8,380/1,437, MSMI 11,080/1,775), capped by
  what the inputs hold; --mi-share defaults to the paper's 3,038/12,855 multi-instance share.
- Byte-deterministic for a seed regardless of --workers (sorted iteration, per-image seeded RNGs,
  COCO images linked unchanged, no timestamps). Every file is written atomically (temp +
  os.replace) and only when missing or different, CSVs and summary last: an interrupted run
  resumes, and a re-run of a finished build rewrites nothing.
"""
import argparse
import colorsys
import contextlib
import csv
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import sys
import time
import wave
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from data import (AVS_S4_CATEGORIES, VPO_AUDIO_LABELS, VPO_CLASSES, VPO_COCO_IDS, VPO_SUBSETS, AVSBenchDataset,
                  DataError, _read_csv, decode_coco, read_wav, write_wav)

SUBSETS = ("ss", "ms", "msmi")
SPLITS = (("train", "train2017", "train"), ("val", "val2017", "test"))  # VPO split, COCO, VGGSound
VGG_SPLIT = {split: vgg for split, _, vgg in SPLITS}
PAPER_SIZES = {"ss": (11312, 890), "ms": (8380, 1437), "msmi": (11080, 1775)}  # CAVP Sec. 3
PAPER_MI_SHARE = 3038 / 12855  # multi-instance images in VPO-MSMI (Sec. 3)
MAX_SOURCES = 5  # VPO-MS: up to five sounding objects (Sec. 3)
CLASS_ID = dict(zip(VPO_CLASSES[1:], VPO_COCO_IDS))
CLASS_NAME = {v: k for k, v in CLASS_ID.items()}
TABLE7 = {lab: CLASS_ID[c] for c, labs in VPO_AUDIO_LABELS.items() for lab in labs}  # VGGSound label -> class id
PERSONS = ("male", "female", "baby")
PERSON_WORDS = {
    "male": {"man", "men", "boy", "boys", "guy", "guys", "male", "males", "gentleman", "gentlemen",
             "father", "dad", "husband", "son", "brother", "groom"},
    "female": {"woman", "women", "girl", "girls", "lady", "ladies", "female", "females", "mother",
               "mom", "wife", "daughter", "sister", "bride"},
    "baby": {"baby", "babies", "infant", "infants", "toddler", "toddlers"},
}
ANIMALS = {"bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"}
CSV_COLUMNS = ["cateName", "img_Id", "ann_Ids", "cateId", "vgg_file", "split", "audio_pos"]


# ---------------------------------------------------------------- atomic, idempotent file writes
def _atomic(path, write):
    """Run write(tmp) then os.replace(tmp, path); never leaves a half-written `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def put_bytes(path, data):
    """Write `data` atomically unless `path` already holds exactly these bytes."""
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        if f.read() == data:
            return

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    _atomic(path, write)


def _is_current(src, dst):
    """dst is src (hard link) or an independent copy of the same size."""
    if not os.path.exists(dst):
        return False
    st = os.stat(dst)
    return os.path.samefile(src, dst) or (st.st_nlink == 1 and st.st_size == os.path.getsize(src))


def put_link(src, dst):
    """Hard-link src at dst (copy when linking fails, e.g. across devices) unless already there."""
    if _is_current(src, dst):
        return

    def link(tmp):
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    _atomic(dst, link)


def put_wav(path, wave_, sample_rate):
    """data.write_wav, but leave `path` untouched when it already holds the same bytes."""
    tmp = f"{path}.{os.getpid()}.new"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        write_wav(tmp, wave_, sample_rate)
        with open(tmp, "rb") as f:
            data = f.read()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    put_bytes(path, data)


def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


class Progress:
    """Throttled progress line on stderr: done/total, rate, ETA."""

    def __init__(self, what, total):
        self.what, self.total, self.done = what, total, 0
        self.tty = sys.stderr.isatty()
        self.every = 0.5 if self.tty else 10.0
        self.t0 = self.last = time.monotonic()

    def step(self):
        self.done += 1
        now = time.monotonic()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = int((self.total - self.done) / rate)
        end = "\r" if self.tty and self.done < self.total else "\n"
        print(f"{self.what}: {self.done}/{self.total} ({rate:.0f}/s, ETA {eta // 60}m{eta % 60:02d}s)",
              end=end, file=sys.stderr, flush=True)


def _run(task):
    fn, args = task
    return fn(*args)


def run_tasks(tasks, workers, what):
    """Run (fn, args) tasks in order (Pool.imap when workers > 1); returns the results."""
    progress, results = Progress(what, len(tasks)), []
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(tasks) > 1:
            pool = stack.enter_context(multiprocessing.Pool(workers))
            chunk = max(1, min(64, len(tasks) // (8 * workers)))
            it = pool.imap(_run, tasks, chunksize=chunk)
        else:
            it = map(_run, tasks)
        for r in it:
            results.append(r)
            progress.step()
    return results


# ---------------------------------------------------------------- COCO side
@dataclass
class Obj:
    ann_id: int
    cid: int  # VPO COCO category id (92/93/94 for persons)
    seg: object  # COCO segmentation: polygons, uncompressed or compressed RLE


@dataclass
class Img:
    id: int
    split: str
    path: str
    h: int
    w: int
    objs: dict = field(default_factory=dict)  # cid -> [Obj] non-crowd, ascending ann id
    crowds: dict = field(default_factory=dict)  # cid -> [Obj] crowd regions

    @property
    def single(self):
        return not self.crowds and all(len(v) == 1 for v in self.objs.values())

    def multi_classes(self):
        return sorted(c for c, v in self.objs.items() if len(v) > 1 or c in self.crowds)


def person_class(captions):
    """VPO class of an image's persons from its COCO captions: 'male', 'female', 'baby' or None.

    A caption word of exactly one group (PERSON_WORDS) decides; none or several -> None
    (ambiguous: the persons are not sound sources). "baby <animal>" is not a person word.
    """
    groups = set()
    for text in captions:
        words = re.findall(r"[a-z]+", text.lower())
        for word, nxt in zip(words, words[1:] + [""]):
            if word in PERSON_WORDS["baby"] and nxt.rstrip("s") in ANIMALS:
                continue
            groups |= {g for g, ws in PERSON_WORDS.items() if word in ws}
    return groups.pop() if len(groups) == 1 else None


def _read_json(path, keys, fix):
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read JSON ({e}); re-download it") from e
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise DataError(f"{path}: not a COCO annotation file (no {', '.join(missing)}); re-download it")
    return data


def warn(msg, kind="warning"):
    """One `warning: ...` (or `note: ...`) line on stderr."""
    print(f"{kind}: {msg}", file=sys.stderr, flush=True)


def _skip(strict, what, skipped, fix):
    """Missing COCO input: a warning and skip it, or with --strict an error."""
    if strict:
        raise DataError(f"{what}; {fix}, or drop --strict to skip {skipped}")
    warn(f"{what}; skipped {skipped} (pass --strict to stop instead)")


@contextlib.contextmanager
def _malformed(path):
    """A KeyError / TypeError while reading COCO annotation file `path` -> one DataError line."""
    try:
        yield
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: malformed COCO annotation ({e!r}); re-download it") from e


def load_coco(root, strict=False):
    """COCO 2017 -> (images with VPO objects on disk, sorted by split then id; stats).

    stats: person-rule counts, COCO image folders not found (their split is skipped) and the number
    of images listed in the annotations but not on disk (skipped); with `strict` both are errors.
    """
    fix = "pass --coco pointing at a COCO 2017 root (annotations/, train2017/, val2017/)"
    if not any(os.path.isdir(os.path.join(root, folder)) for _, folder, _ in SPLITS):
        raise DataError(f"{root}: neither train2017/ nor val2017/ found; {fix}")
    images, persons, splits_missing, absent = [], Counter(), [], 0
    for split, folder, _ in SPLITS:
        image_dir, ann_dir = os.path.join(root, folder), os.path.join(root, "annotations")
        if not os.path.isdir(image_dir):
            _skip(strict, f"{image_dir} not found", f"the VPO {split} split",
                  f"download the COCO {folder} images there")
            splits_missing.append(folder)
            continue
        path, captions = os.path.join(ann_dir, f"captions_{folder}.json"), {}
        with _malformed(path):
            for c in _read_json(path, ("annotations",), fix)["annotations"]:
                captions.setdefault(c["image_id"], []).append(c["caption"])
        path = os.path.join(ann_dir, f"instances_{folder}.json")
        with _malformed(path):
            found, gone, listed = _index_split(_read_json(path, ("images", "annotations", "categories"), fix),
                                               captions, image_dir, split, persons)
        if gone:
            _skip(strict, f"{len(gone)} of {listed} images listed in {path} are not on disk (first: "
                  f"{os.path.join(image_dir, gone[0])})", "them", "download them")
        images += found
        absent += len(gone)
    persons = {k: persons[k] for k in (*PERSONS, "ambiguous")}
    return images, dict(persons=persons, coco_splits=splits_missing, coco_images=absent)


def _index_split(data, captions, image_dir, split, persons):
    """(images of one COCO split on disk that hold VPO objects, file names not on disk, images
    listed); counts the person rule's outcomes. Only person and VPO-class annotations are indexed."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    anns = {}
    for a in data["annotations"]:
        if names[a["category_id"]] in CLASS_ID or names[a["category_id"]] == "person":
            anns.setdefault(a["image_id"], []).append(a)
    on_disk, images, absent = set(os.listdir(image_dir)), [], []
    for info in sorted(data["images"], key=lambda i: i["id"]):
        if info["file_name"] not in on_disk:
            absent.append(info["file_name"])
            continue
        path = os.path.join(image_dir, info["file_name"])
        img = Img(info["id"], split, path, info["height"], info["width"])
        img_anns = sorted(anns.get(img.id, []), key=lambda a: a["id"])
        gender = person_class(captions.get(img.id, []))
        if any(names[a["category_id"]] == "person" for a in img_anns):
            persons[gender or "ambiguous"] += 1
        for a in img_anns:
            name = gender if names[a["category_id"]] == "person" else names[a["category_id"]]
            if name in CLASS_ID:
                group = img.crowds if a.get("iscrowd", 0) else img.objs
                group.setdefault(CLASS_ID[name], []).append(Obj(a["id"], CLASS_ID[name], a["segmentation"]))
        if img.objs:
            images.append(img)
    return images, absent, len(data["images"])


def silence(images, sounding):
    """Objects and crowd regions of classes without clips become background (never sources).
    -> (images that still hold a sounding object, {class id: images affected})."""
    affected, kept = Counter(), []
    for img in images:
        mute = {c for c in (*img.objs, *img.crowds) if c not in sounding}
        affected.update(mute)
        for c in mute:
            img.objs.pop(c, None)
            img.crowds.pop(c, None)
        if img.objs:
            kept.append(img)
    return kept, affected


# ---------------------------------------------------------------- VGGSound side
CSV_FIELDS = ("youtube_id", "start_seconds", "label", "split")
COLUMN_NAMES = (("youtubeid", "ytid", "videoid"), ("startseconds", "start", "startsec", "starttime"),
                ("label",), ("split", "traintestsplit"))  # header names, lowercase letters only


def convert_command(audio, exts):
    """Shell loop that writes a 16 kHz mono 16-bit PCM WAV next to every clip with these extensions."""
    pattern = exts[0] if len(exts) == 1 else "{" + ",".join(exts) + "}"
    return (f'for f in {audio}/*.{pattern}; do ffmpeg -nostdin -loglevel error -i "$f" -vn -ac 1 -ar 16000 '
            f'-c:a pcm_s16le "${{f%.*}}.wav"; done')


def wav_ok(path):
    """Whether data.read_wav reads at least one sample from `path` (only the header for PCM WAV)."""
    try:
        with wave.open(path, "rb") as w:
            return w.getnframes() > 0
    except (wave.Error, EOFError):  # float or extensible WAV, which read_wav decodes, or no WAV at all
        with contextlib.suppress(DataError, OSError, ValueError, EOFError):
            return read_wav(path)[0].shape[1] > 0
        return False
    except OSError:
        return False


def _columns(header):
    """Column indices of CSV_FIELDS named in a header row, or the first four columns."""
    names = [re.sub(r"[^a-z]", "", h.lower()) for h in header]
    found = [next((i for i, n in enumerate(names) if n in aliases), None) for aliases in COLUMN_NAMES]
    return [0, 1, 2, 3] if None in found else found


def _read_vggsound_csv(path):
    """Rows (youtube_id, start_seconds, label, split) of vggsound.csv. A header row (its second field
    is not an integer) and extra columns are accepted with a note."""
    rows, cols, header, width = [], [0, 1, 2, 3], None, 4
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            for line, row in enumerate(csv.reader(f), 1):
                if not "".join(row).strip():
                    continue
                if not rows and header is None and len(row) > 1 and not row[1].strip().isdigit():
                    header, cols = row, _columns(row)
                    continue
                got = [row[i].strip() for i in cols if i < len(row)]
                if len(got) < 4 or got[3] not in ("train", "test") or not got[1].isdigit():
                    raise DataError(f"{path}:{line}: expected {','.join(CSV_FIELDS)}(train|test), "
                                    f"got {','.join(row)!r}")
                rows.append(got)
                width = max(width, len(row))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read CSV ({e}); re-download it") from e
    if header is not None or width > 4:
        skipped = f"header row {','.join(header)!r} skipped, " if header is not None else ""
        warn(f"{path}: {skipped}{width} columns; reading {','.join(CSV_FIELDS)} from columns "
             f"{','.join(str(i + 1) for i in cols)}", "note")
    return rows


def load_vggsound(root, labels=TABLE7, what="Table 7"):
    """vggsound.csv + audio/ -> ({key: {"train": [vgg_file], "test": [...]}}, stats, labels missing) for the
    VGGSound labels of `labels` ({label: key}; default CAVP Table 7 -> COCO class id; `what` names them).

    Listed clips missing on disk, present only in another format (.flac, .mp4, ...) or not readable
    as WAV are skipped and counted, with a warning; a label without a usable clip is a
    warning. Stops only when no label has a usable clip.
    """
    path, audio = os.path.join(root, "vggsound.csv"), os.path.join(root, "audio")
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; pass --vggsound pointing at the VGGSound root")
    if not os.path.isdir(audio):
        raise DataError(f"{audio} not found; put the clips there as {{youtube_id}}_{{start:06d}}.wav")
    wavs, others = set(), {}
    for name in os.listdir(audio):
        stem, ext = os.path.splitext(name)
        if ext == ".wav":
            wavs.add(stem)
        elif ext:
            others[stem] = ext[1:]
    pools = {key: {"train": set(), "test": set()} for key in labels.values()}
    found, not_wav, bad, listed, missing = Counter(), Counter(), [], 0, 0
    for ytid, start, label, split in _read_vggsound_csv(path):
        if label not in labels:
            continue
        stem = f"{ytid}_{int(start):06d}"
        listed += 1
        if stem not in wavs:
            if stem in others:
                not_wav[others[stem]] += 1
            else:
                missing += 1
        elif wav_ok(os.path.join(audio, stem + ".wav")):
            found[label] += 1
            pools[labels[label]][split].add(stem)
        else:
            bad.append(stem + ".wav")
    exts = sorted(not_wav, key=lambda e: (-not_wav[e], e))
    convert = f"convert them to WAV: {convert_command(audio, exts)}" if exts else ""
    if not found:
        why = f"{sum(not_wav.values())} are .{'/.'.join(exts)}, not WAV; {convert}" if exts else \
            f"download the clips of the {what} labels (README)"
        raise DataError(f"{audio}: no usable clip of the {listed} {what} clips listed in {path}; {why}")
    if missing:
        warn(f"{missing} of {listed} {what} clips listed in {path} are not in {audio}; skipped them")
    if exts:
        warn(f"{sum(not_wav.values())} listed clips are in {audio} as .{'/.'.join(exts)}, not WAV; "
             f"skipped them; {convert}")
    if bad:
        warn(f"{len(bad)} clips in {audio} are not readable WAV (first: {bad[0]}); skipped them; re-encode "
             "each as 16-bit PCM: ffmpeg -i IN -vn -ac 1 -ar 16000 -c:a pcm_s16le OUT.wav")
    labels_missing = sorted(lab for lab in labels if not found[lab])
    for label in labels_missing:
        name = CLASS_NAME.get(labels[label], labels[label])
        if any(pools[labels[label]].values()):
            warn(f"VGGSound label {label!r} has no usable clip in {audio}; "
                 f"class {name} uses its other labels")
    pools = {c: {s: sorted(v) for s, v in p.items()} for c, p in pools.items()}
    stats = dict(clips_listed=listed, clips_missing=missing, clips_not_wav=sum(not_wav.values()),
                 clips_unreadable=len(bad))
    return pools, stats, labels_missing


# ---------------------------------------------------------------- sampling (CAVP Sec. 3)
@dataclass
class Sample:
    img: Img
    sources: list  # [(Obj, vgg_file)], ascending class id
    multi: bool = False


def _rng(seed, *keys):
    return random.Random("/".join(map(str, (seed, *keys))))


def _clip(rng, pools, cid, split):
    return rng.choice(pools[cid][VGG_SPLIT[split]] or pools[cid]["train"] + pools[cid]["test"])


def _with_clips(img, objs, rng, pools, multi=False):
    return Sample(img, [(o, _clip(rng, pools, o.cid, img.split)) for o in objs], multi)


def _sounding(img, rng, focus=None):
    """Sounding objects: one per sounding class, at most MAX_SOURCES classes. With more than two
    objects some are silenced at random (Sec. 3); `focus` (MSMI) is a repeated class that sounds."""
    classes = sorted(img.objs)
    if sum(map(len, img.objs.values())) <= 2:
        chosen = classes
    else:
        lead = [] if focus is None else [focus]
        cap = min(MAX_SOURCES, len(classes) - (not lead))  # MS (no focus): at least one object silent
        others = [c for c in classes if c != focus]
        chosen = lead + rng.sample(others, rng.randint(1, cap) - len(lead))
    return [rng.choice(img.objs[c]) for c in sorted(chosen)]


def plan(images, pools, sizes, mi_share, seed, mi_single=False):
    """-> ({subset: [Sample]} sorted by split then image id, {split: eligible image counts}).
    mi_single: a multi-instance image sounds through one instance of its repeated class only."""
    out, eligible = {s: [] for s in SUBSETS}, {}
    for split, _, _ in SPLITS:
        imgs = sorted((i for i in images if i.split == split),
                      key=lambda i: (-len(i.objs), _rng(seed, "order", i.id).random()))
        singles = [i for i in imgs if i.single]
        multis = [i for i in imgs if not i.single and i.multi_classes()]
        eligible[split] = dict(single=len(singles), multi=len(multis))
        col = 0 if split == "train" else 1
        n_msmi = sizes["msmi"][col]
        n_mi = min(round(n_msmi * mi_share), len(multis))
        for img in singles[:sizes["ss"][col]]:  # VPO-SS: one random class sounds
            rng = _rng(seed, "ss", img.id)
            out["ss"].append(_with_clips(img, [img.objs[rng.choice(sorted(img.objs))][0]], rng, pools))
        ms = []
        for img in singles[:max(sizes["ms"][col], n_msmi - n_mi)]:
            rng = _rng(seed, "ms", img.id)
            ms.append(_with_clips(img, _sounding(img, rng), rng, pools))
        out["ms"] += ms[:sizes["ms"][col]]
        out["msmi"] += ms[:n_msmi - n_mi]  # VPO-MSMI = VPO-MS + multi-instance images (Sec. 3)
        for img in multis[:n_mi]:
            rng = _rng(seed, "mi", img.id)
            focus = rng.choice(img.multi_classes())
            objs = [rng.choice(img.objs[focus])] if mi_single else _sounding(img, rng, focus)
            out["msmi"].append(_with_clips(img, objs, rng, pools, multi=True))
    for samples in out.values():
        samples.sort(key=lambda s: (s.img.split != "train", s.img.id))
    return out, eligible


# ---------------------------------------------------------------- writing
def write_mask(dst, h, w, crowd_segs, sources):
    """Mask PNG of the sounding objects; returns their audio_pos (centre of mass x / width)."""
    mask = np.zeros((h, w), np.uint8)
    for seg in crowd_segs:
        mask[decode_coco(seg, h, w) > 0] = 255
    alphas = []
    for cid, seg in sources:
        inst = decode_coco(seg, h, w) > 0
        mask[inst] = cid
        xs = np.nonzero(inst)[1]
        alphas.append(float((xs.mean() + 0.5) / w) if xs.size else 0.5)  # pixel centres
    put_bytes(dst, png_bytes(mask))
    return alphas


def link_clip(src, dst):
    """Check that a VGGSound clip is a readable, non-empty WAV, then link it into DATA_ROOT/audio."""
    if _is_current(src, dst):
        return
    try:
        x, _ = read_wav(src)
    except (ValueError, EOFError) as e:
        raise DataError(f"{src}: unreadable WAV ({e}); re-download the clip") from e
    if x.shape[1] == 0:
        raise DataError(f"{src}: WAV has no samples; re-download the clip")
    put_link(src, dst)


def _sample_paths(out, subset, s):
    d, name = os.path.join(out, VPO_SUBSETS[subset]), f"{s.img.id:012d}"
    if subset == "ss":
        obj = s.sources[0][0]
        cate = CLASS_NAME[obj.cid]
        return (os.path.join(d, "data", cate, name + ".jpg"),
                os.path.join(d, "mask", cate, f"{name}_{obj.ann_id:012d}.png"))
    return os.path.join(d, "data", name + ".jpg"), os.path.join(d, "mask", name + ".png")


def _csv_bytes(subset, samples, alphas):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + (["multi_instance"] if subset == "msmi" else []))
    for s, al in zip(samples, alphas):
        for (obj, vgg), a in zip(s.sources, al):
            writer.writerow([CLASS_NAME[obj.cid], s.img.id, f"[{obj.ann_id}]", obj.cid, vgg,
                             s.img.split, f"{a:.6f}"] + ([int(s.multi)] if subset == "msmi" else []))
    return buf.getvalue().encode("utf-8")


def write_dataset(subsets, vgg_root, out, workers):
    """Link clips and images and write masks (in parallel), then the CSVs."""
    audio_dir, tasks, spans = os.path.join(vgg_root, "audio"), [], {}
    stems = sorted({vgg for ss in subsets.values() for s in ss for _, vgg in s.sources})
    tasks += [(link_clip, (os.path.join(audio_dir, v + ".wav"), os.path.join(out, "audio", v + ".wav")))
              for v in stems]  # first: unreadable clips fail early
    for subset, samples in subsets.items():
        spans[subset] = len(tasks)
        for s in samples:
            image, mask = _sample_paths(out, subset, s)
            crowd = [c.seg for o, _ in s.sources for c in s.img.crowds.get(o.cid, [])]
            tasks.append((write_mask, (mask, s.img.h, s.img.w, crowd,
                                       [(o.cid, o.seg) for o, _ in s.sources])))
    links = sorted({(s.img.path, _sample_paths(out, subset, s)[0])
                    for subset, samples in subsets.items() for s in samples})
    results = run_tasks(tasks + [(put_link, pair) for pair in links], workers, "vpo files")
    alphas = {k: results[i:i + len(subsets[k])] for k, i in spans.items()}
    for subset, samples in subsets.items():
        d = os.path.join(out, VPO_SUBSETS[subset])
        put_bytes(os.path.join(d, f"vpo_{subset}_data_stereo.csv"),
                  _csv_bytes(subset, samples, alphas[subset]))


def summarize(subsets, sizes, seed, mi_share, mi_single, stats):
    """Per-subset sizes, per-class source counts and imbalance ratio N_max/N_min (App. A.1), plus
    the inputs' statistics and what was missing from them (`stats`, see prepare)."""
    summary = dict(seed=seed, mi_share=round(mi_share, 6), mi_single_source=mi_single, **stats, subsets={})
    for subset, samples in subsets.items():
        entry = {}
        for col, (split, _, _) in enumerate(SPLITS):
            part = [s for s in samples if s.img.split == split]
            entry[split] = dict(samples=len(part), sources=sum(len(s.sources) for s in part),
                                requested=sizes[subset][col])
            if subset == "msmi":
                entry[split]["multi_instance"] = sum(s.multi for s in part)
        counts = Counter(CLASS_NAME[o.cid] for s in samples for o, _ in s.sources)
        entry["classes"] = {c: counts[c] for c in VPO_CLASSES[1:]}
        if counts:
            (hi, n_hi), (lo, n_lo) = counts.most_common()[0], counts.most_common()[-1]
            entry["imbalance"] = dict(ratio=round(n_hi / n_lo, 2), max=hi, min=lo,
                                      absent=[c for c in VPO_CLASSES[1:] if not counts[c]])
        summary["subsets"][subset] = entry
    return summary


def format_summary(summary):
    lines = [f"VPO build (seed {summary['seed']})",
             f"{'subset':9}{'train':>7}{'val':>6}{'sources':>9}  imbalance N_max/N_min"]
    subs = summary["subsets"]
    for k, e in subs.items():
        imb = e.get("imbalance")
        text = f"{imb['ratio']:.2f} ({imb['max']} / {imb['min']})" if imb else "-"
        lines.append(f"{VPO_SUBSETS[k]:9}{e['train']['samples']:7d}{e['val']['samples']:6d}"
                     f"{e['train']['sources'] + e['val']['sources']:9d}  {text}")
        lines += [f"  warning: {VPO_SUBSETS[k]} {sp} has {e[sp]['samples']} samples, "
                  f"{e[sp]['requested']} requested (inputs exhausted)"
                  for sp in ("train", "val") if e[sp]["samples"] < e[sp]["requested"]]
    lines.append(f"{'class':14}" + "".join(f"{VPO_SUBSETS[k]:>9}" for k in subs))
    lines += [f"{c:14}" + "".join(f"{subs[k]['classes'][c]:9d}" for k in subs) for c in VPO_CLASSES[1:]]
    persons = ", ".join(f"{k} {v}" for k, v in summary["persons"].items())
    lines.append(f"persons (images, caption rule): {persons}")
    lines += vggsound_lines(summary, "Table 7")
    m = summary["missing"]
    if m["classes"]:
        lines.append("silent classes (no clip; objects are background): "
                     + ", ".join(f"{c} in {n} images" for c, n in m["classes"].items()))
    coco = [f"{folder}/ (split skipped)" for folder in m["coco_splits"]]
    coco += [f"{m['coco_images']} listed images (skipped)"] if m["coco_images"] else []
    if coco:
        lines.append("missing COCO: " + ", ".join(coco))
    return "\n".join(lines)


def vggsound_lines(summary, what):
    """The summary's lines on the VGGSound clips: listed, skipped, used, labels without a usable clip."""
    v, labels = summary["vggsound"], summary["missing"]["labels"]
    lines = [f"vggsound: {v['clips_listed']} {what} clips listed, skipped {v['clips_missing']} missing, "
             f"{v['clips_not_wav']} not WAV and {v['clips_unreadable']} unreadable; {v['clips_used']} used"]
    if labels:
        lines.append("missing VGGSound labels (no usable clip): " + ", ".join(map(repr, labels)))
    return lines


def prepare(coco_root, vgg_root, sizes, mi_share, seed, strict=False, mi_single=False):
    """Read COCO and VGGSound and plan the subsets -> ({subset: [Sample]}, stats).

    stats: persons (person-rule counts), vggsound (clip counts), eligible_images (per split) and
    missing: labels (Table 7 labels without a usable clip), classes ({class: images} whose objects
    are silent because the class has no clip), coco_splits (image folders not found), coco_images
    (listed images not on disk). Stops only when no image holds an object of a class with clips.
    """
    print(f"reading COCO annotations from {coco_root} ...", file=sys.stderr, flush=True)
    images, coco = load_coco(coco_root, strict)
    pools, vgg_stats, labels_missing = load_vggsound(vgg_root)
    sounding = {c for c, p in pools.items() if p["train"] or p["test"]}
    images, affected = silence(images, sounding)
    silent = {CLASS_NAME[c]: affected[c] for c in VPO_COCO_IDS if c not in sounding}
    for name, n in silent.items():
        labels = ", ".join(map(repr, VPO_AUDIO_LABELS[name]))
        warn(f"class {name} has no usable VGGSound clip ({labels}); its objects are silent "
             f"(background, never a source) in {n} images")
    if not images:
        have = ", ".join(CLASS_NAME[c] for c in VPO_COCO_IDS if c in sounding)
        raise DataError(f"nothing to build: no COCO image on disk under {coco_root} holds an object of a "
                        f"class with VGGSound clips ({have}); add COCO images or clips of the same classes")
    subsets, eligible = plan(images, pools, sizes, mi_share, seed, mi_single)
    missing = dict(labels=labels_missing, classes=silent, coco_splits=coco["coco_splits"],
                   coco_images=coco["coco_images"])
    return subsets, dict(persons=coco["persons"], vggsound=vgg_stats, eligible_images=eligible,
                         missing=missing)


def build(coco_root, vgg_root, out, sizes=None, mi_share=PAPER_MI_SHARE, seed=0, workers=1,
          synthetic_size=None, strict=False, mi_single=False):
    """Real-mode builder: COCO + VGGSound -> DATA_ROOT (see module docstring); returns the summary.

    synthetic_size: the image side of built-in sources; recorded in the summary ("synthetic",
    "image_size") so that the training scripts pick their CPU-sized defaults. strict: missing COCO
    images or image folders are errors instead of warnings. mi_single: see plan.
    """
    sizes = sizes or PAPER_SIZES
    subsets, stats = prepare(coco_root, vgg_root, sizes, mi_share, seed, strict, mi_single)
    write_dataset(subsets, vgg_root, out, workers)
    stats["vggsound"]["clips_used"] = len({v for ss in subsets.values() for s in ss for _, v in s.sources})
    summary = summarize(subsets, sizes, seed, mi_share, mi_single, stats)
    summary.update(synthetic=synthetic_size is not None, image_size=synthetic_size)
    put_bytes(os.path.join(out, "vpo_summary.json"), (json.dumps(summary, indent=1) + "\n").encode())
    return summary


# ---------------------------------------------------------------- AVS-M-SS (CAVP Sec. 5.2)
# AVSBench S4's 23 categories are VGGSound labels (AVS §3) written with '_' for ' '; three VGGSound labels add an
# alternative name after a comma, which S4 drops
S4_VGGSOUND = {c: {"male_speech": "male speech, man speaking", "playing_violin": "playing violin, fiddle",
                   "race_car": "race car, auto racing"}.get(c, c.replace("_", " ")) for c in AVS_S4_CATEGORIES}
AVS_MSS_SPLIT = {"train": "train", "val": "test", "test": "test"}  # S4 split -> VGGSound split


def build_avs_mss(avs_root, vgg_root, out, seed=0, workers=1):
    """AVS-M-SS (CAVP Sec. 5.2): AVSBench-Objects S4 with each clip's audio replaced by a VGGSound clip of its
    category (S4_VGGSOUND), drawn with a per-clip seeded RNG from the VGGSound split that matches the S4 split
    (train -> train, val / test -> test; a category without clips there draws from all its clips). A category
    without any usable clip keeps its clips' AVSBench audio (warning; counted). Writes the S4 layout to
    out/Single-source (CSV copied, frames, masks and clips hard-linked), out/avs_mss_audio.csv (each clip's
    VGGSound clip, empty where the AVSBench audio was kept) and out/avs_mss_summary.json; returns the summary."""
    if not any(os.path.isfile(os.path.join(avs_root, *sub, "s4_meta_data.csv")) for sub in ((), ("Single-source",))):
        raise DataError(f"{avs_root}: no s4_meta_data.csv in it or in its Single-source/; pass --avsbench pointing "
                        "at the AVSBench root")
    clips = AVSBenchDataset(avs_root, "s4", "train", size=None)  # checks the layout; the CSV for every split
    rows, header = _read_csv(clips.csv, ["split"], "")
    pools, vgg_stats, labels_missing = load_vggsound(vgg_root, {S4_VGGSOUND[c]: c for c in AVS_S4_CATEGORIES},
                                                     "S4-category")
    category = {r[header[0]]: r[header[2]] for r in rows}
    dst = os.path.join(out, "Single-source")
    tasks, audio_rows, splits, counts = [], [], {}, {}
    for split in ("train", "val", "test"):
        if not any(r["split"] == split for r in rows):
            continue
        samples = clips.samples if split == "train" else AVSBenchDataset(avs_root, "s4", split, size=None).samples
        splits[split] = dict(clips=len(samples), replaced=0, kept=0)
        for s in samples:
            cat = category[s["name"]]
            pool = pools.get(cat, {"train": [], "test": []})
            choices = pool[AVS_MSS_SPLIT[split]] or pool["train"] + pool["test"]
            vgg = _rng(seed, "avs-mss", split, s["name"]).choice(choices) if choices else ""
            wav = os.path.join(dst, os.path.relpath(s["wav"], clips.dir))
            tasks.append((link_clip, (os.path.join(vgg_root, "audio", vgg + ".wav"), wav)) if vgg else
                         (put_link, (s["wav"], wav)))
            tasks += [(put_link, (p, os.path.join(dst, os.path.relpath(p, clips.dir))))
                      for p in s["frames"] + [m for m in s["masks"] if m]]
            kind = "replaced" if vgg else "kept"
            splits[split][kind] += 1
            counts.setdefault(cat, Counter())[kind] += 1
            audio_rows.append([s["name"], split, cat, vgg])
    kept = {c: n["kept"] for c, n in sorted(counts.items()) if n["kept"]}
    for cat, n in kept.items():
        label = f"VGGSound label {S4_VGGSOUND[cat]!r}" if cat in S4_VGGSOUND else "no VGGSound label"
        warn(f"S4 category {cat} ({label}) has no usable VGGSound clip; its {n} clips keep their AVSBench audio")
    run_tasks(tasks, workers, "avs-mss files")
    with open(clips.csv, "rb") as f:
        put_bytes(os.path.join(dst, os.path.basename(clips.csv)), f.read())
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([["name", "split", "category", "vgg_file"]] + audio_rows)
    put_bytes(os.path.join(out, "avs_mss_audio.csv"), buf.getvalue().encode())
    vgg_stats["clips_used"] = len({r[3] for r in audio_rows if r[3]})
    summary = dict(seed=seed, avsbench=os.path.abspath(avs_root), vggsound=vgg_stats, splits=splits,
                   categories={c: dict(label=S4_VGGSOUND.get(c), replaced=n["replaced"], kept=n["kept"])
                               for c, n in sorted(counts.items())},
                   missing=dict(labels=labels_missing, categories=kept))
    put_bytes(os.path.join(out, "avs_mss_summary.json"), (json.dumps(summary, indent=1) + "\n").encode())
    return summary


def format_avs_mss(summary):
    lines = [f"AVS-M-SS build (seed {summary['seed']}): AVSBench S4 clips with a VGGSound clip of their category",
             f"{'split':7}{'clips':>7}{'replaced':>10}{'kept':>6}"]
    lines += [f"{s:7}{n['clips']:7d}{n['replaced']:10d}{n['kept']:6d}" for s, n in summary["splits"].items()]
    lines.append(f"{'S4 category':30}{'VGGSound label':32}{'replaced':>9}{'kept':>6}")
    lines += [f"{c:30}{str(n['label']):32}{n['replaced']:9d}{n['kept']:6d}" for c, n in summary["categories"].items()]
    lines += vggsound_lines(summary, "S4-category")
    if summary["missing"]["categories"]:
        lines.append("categories keeping their AVSBench audio (no clip): "
                     + ", ".join(f"{c} in {n} clips" for c, n in summary["missing"]["categories"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------- built-in synthetic sources
# train / test per subset: cavp.py --epochs 80 in minutes on 2 CPU cores; a 300-image test set
# so that one class flipping moves mIoU by well under 2 points
SYNTHETIC_SIZES = (128, 300)
SYNTHETIC_MI_SHARE = 0.5  # half of VPO-MSMI needs the stereo cue
SR = 16000
CLIP_SECONDS = 3.0
CLIPS_PER_CLASS = {"train": 12, "test": 4}
SPLIT_ID_OFFSET = {"train": 0, "val": 500000}
SHAPES = ("square", "triangle", "cross", "star", "disc", "ring", "crescent")
TEXTURES = ("solid", "stripes", "checker")
_CROSS = [(1, 3), (1, 1), (3, 1), (3, -1), (1, -1), (1, -3),
          (-1, -3), (-1, -1), (-3, -1), (-3, 1), (-1, 1), (-1, 3)]
POLYGONS = {  # unit outlines (x, y) of the polygon-annotated shapes
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)]) * 0.72,
    "triangle": np.stack([np.cos(np.pi * (4 * np.arange(3) / 3 - 0.5)),
                          np.sin(np.pi * (4 * np.arange(3) / 3 - 0.5))], 1),
    "cross": np.array(_CROSS) * 0.31,
    "star": np.stack([np.cos(np.pi * np.arange(10) / 5), np.sin(np.pi * np.arange(10) / 5)], 1)
    * np.where(np.arange(10) % 2, 0.45, 1.0)[:, None],
}
PERSON_PHRASES = {  # (singular, plural) phrases; None = neutral caption (ambiguous persons)
    "male": (("a man", "two men"), ("a boy", "two boys"), ("a guy", "two guys")),
    "female": (("a woman", "two women"), ("a girl", "two girls"), ("a lady", "two ladies")),
    "baby": (("a baby", "two babies"), ("an infant", "two infants"), ("a toddler", "two toddlers")),
    None: (("a person", "two people"), ("someone", "two persons")),
}
PLURALS = {"sheep": "sheep", "mouse": "mice", "bus": "buses"}
TEMPLATES = ("{} in a cluttered scene", "a photo of {}", "{} on a noisy background")


def _look(k):
    """Visual family of VPO class index k (0..20): unique (shape, texture); hue k/21."""
    return SHAPES[k % 7], TEXTURES[k // 7], k / 21


def _shape_mask(shape, cx, cy, r, theta, size):
    """(mask, COCO segmentation) of one object; polygons rasterised by pycocotools itself so the
    painted pixels equal the decoded annotation."""
    if shape in POLYGONS:
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        pts = POLYGONS[shape] @ rot.T * r + (cx, cy)
        poly = [round(float(v), 2) for v in pts.ravel()]
        return decode_coco([poly], size, size).astype(bool), [poly]
    yy, xx = np.mgrid[:size, :size] + 0.5
    mask = np.hypot(xx - cx, yy - cy) <= r
    if shape == "ring":
        mask &= np.hypot(xx - cx, yy - cy) >= 0.55 * r
    if shape == "crescent":
        bite = (cx + 0.5 * r * np.cos(theta), cy + 0.5 * r * np.sin(theta))
        mask &= np.hypot(xx - bite[0], yy - bite[1]) > 0.7 * r
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return mask, {"size": [size, size], "counts": rle["counts"].decode("ascii")}


def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _background(rng, size):
    """Gradient between two dull colours, distractor lines and elongated blobs (no VPO shape)."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    phi = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(phi) + yy * np.sin(phi)
    t = (t - t.min()) / (t.max() - t.min())
    c0, c1 = (_hsv(rng.uniform(), rng.uniform(0, 0.35), rng.uniform(0.3, 0.9)) for _ in range(2))
    img = c0 + (c1 - c0) * t[..., None]
    for _ in range(rng.integers(4, 9)):
        colour = _hsv(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.1, 1.0))
        (x0, y0), (x1, y1) = rng.uniform(0, size, (2, 2))
        if rng.uniform() < 0.5:  # line segment
            d = np.array([x1 - x0, y1 - y0])
            u = np.clip(((xx - x0) * d[0] + (yy - y0) * d[1]) / max(d @ d, 1e-6), 0, 1)
            hit = np.hypot(xx - x0 - u * d[0], yy - y0 - u * d[1]) <= rng.uniform(0.5, 1.2) * size / 64
        else:  # ellipse with aspect >= 2.5
            a = rng.uniform(0.05, 0.15) * size
            b, th = a / rng.uniform(2.5, 4.0), rng.uniform(0, np.pi)
            u = (xx - x0) * np.cos(th) + (yy - y0) * np.sin(th)
            v = -(xx - x0) * np.sin(th) + (yy - y0) * np.cos(th)
            hit = (u / a) ** 2 + (v / b) ** 2 <= 1
        img[hit] = colour
    return img


def _paint(img, rng, mask, k, cx, cy, theta):
    """Paint class k's texture and jittered colour into img where mask is set."""
    _, texture, hue = _look(k)
    base = _hsv(hue + rng.uniform(-0.025, 0.025), rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    size = img.shape[0]
    yy, xx = np.mgrid[:size, :size] + 0.5
    half = max(1, round(size / 32))  # texture half-period in pixels
    u = np.floor(((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / half)
    v = np.floor((-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / half)
    light = {"solid": np.full(u.shape, True), "stripes": u % 2 == 0, "checker": (u + v) % 2 == 0}[texture]
    img[mask] = np.where(light[mask, None], base, base * 0.45)


def _place(rng, size, r, placed, x_range):
    """A centre for a circle of radius r inside x_range that clears the placed circles, or None."""
    for _ in range(100):
        cx, cy = rng.uniform(*x_range), rng.uniform(r + 1, size - r - 1)
        if all(np.hypot(cx - px, cy - py) > r + pr + 2 for px, py, pr in placed):
            return cx, cy
    return None


def _classes(rng, kind):
    """VPO class indices (0..20) of one image; MSMI images repeat a focus class (first)."""
    persons = {VPO_CLASSES.index(p) - 1 for p in PERSONS}
    if kind == "single":
        return list(rng.choice(21, rng.integers(3, 6), replace=False))
    focus = int(rng.integers(21))
    others = [c for c in range(21) if c != focus and not (focus in persons and c in persons)]
    return [focus, focus] + list(rng.choice(others, rng.integers(1, 4), replace=False))


def _caption_phrases(rng, counts, neutral):
    phrases = []
    for k, n in counts.items():
        name = VPO_CLASSES[k + 1]
        if name in PERSONS:
            options = PERSON_PHRASES[None if neutral else name]
            phrases.append(options[rng.integers(len(options))][n > 1])
        elif n > 1:
            phrases.append(f"two {PLURALS.get(name, name + 's')}")
        else:
            young = name in ANIMALS and rng.uniform() < 0.3  # exercises the "baby elephant" rule
            phrases.append("a baby " + name if young else ("an " if name[0] in "aeiou" else "a ") + name)
    order = rng.permutation(len(phrases))
    words = [phrases[i] for i in order]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def synth_image(rng, size, kind):
    """One synthetic image: (uint8 RGB, [(class index, segmentation, area, bbox)], captions).

    kind "single": 3-5 distinct classes; "multi": one class twice, centred in the left and in the
    right 30 % of the width, plus 1-3 other classes. Objects never overlap.
    """
    ks = _classes(rng, kind)
    img, placed, objects = _background(rng, size), [], []
    for i, k in enumerate(ks):
        r = rng.uniform(0.10, 0.16) * size
        x_range = (r + 1, size - r - 1)
        if kind == "multi" and i < 2:  # the twins: centred in the left / right 30 % of the width
            x_range = (r + 1, 0.3 * size) if i == 0 else (0.7 * size, size - r - 1)
        centre = _place(rng, size, r, placed, x_range)
        if centre is None:
            continue
        theta = rng.uniform(0, 2 * np.pi)
        mask, seg = _shape_mask(_look(k)[0], *centre, r, theta, size)
        _paint(img, rng, mask, k, *centre, theta)
        ys, xs = np.nonzero(mask)
        bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]
        placed.append((*centre, r))
        objects.append((k, seg, int(mask.sum()), bbox))
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    counts = Counter(k for k, *_ in objects)
    person_ks = [k for k in counts if VPO_CLASSES[k + 1] in PERSONS]
    neutral = len(person_ks) == 1 and counts[person_ks[0]] == 1 and rng.uniform() < 0.25
    captions = [TEMPLATES[j].format(_caption_phrases(rng, counts, neutral)) for j in range(3)]
    return (img * 255).round().astype(np.uint8), objects, captions


def synth_sound(rng, k, n):
    """Class k's sound family (pitch, harmonics, rhythm, noise band) with per-clip jitter, plus
    background noise; distinct classes are far apart in the 64-band 125-3800 Hz log-mel."""
    t = np.arange(n) / SR
    f0 = 180 * (2200 / 180) ** (((k * 8) % 21) / 20) * rng.uniform(0.97, 1.03)  # permuted pitch
    tone = sum(np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi)) / h
               for h in range(1, (1, 3, 6)[k % 3] + 1) if h * f0 < 7000)
    rate = (0, 2, 3.5, 5, 8, 12, 18)[k // 3] * rng.uniform(0.9, 1.1)  # rhythm: pulse rate in Hz
    if rate:
        tone = tone * (0.55 + 0.45 * np.tanh(4 * np.sin(2 * np.pi * rate * t + rng.uniform(0, 6.3))))
    fc = 300 * (3500 / 300) ** (((k * 5 + 3) % 21) / 20)  # noise band centre
    freqs = np.fft.rfftfreq(n, 1 / SR)
    band = np.fft.irfft(np.fft.rfft(rng.normal(size=n)) * (np.abs(freqs - fc) < fc / 8), n)
    x = tone / np.abs(tone).max() + 0.6 * band / np.abs(band).max()
    x = x / np.abs(x).max() * rng.uniform(0.35, 0.6)
    return x + rng.normal(0, 0.01, n)  # background noise


def _synth_coco(coco_root, size, counts, seed):
    """COCO-format tree: {train,val}2017/*.jpg + instances/captions JSON (polygons and RLE)."""
    cats = [{"id": 1, "name": "person"}] + [{"id": CLASS_ID[c], "name": c}
                                             for c in VPO_CLASSES[1:] if c not in PERSONS]
    ann_id = 0
    for s, (split, folder, _) in enumerate(SPLITS):
        kinds = ["single"] * counts[split][0] + ["multi"] * counts[split][1]
        images, anns, caps = [], [], []
        for i, kind in enumerate(kinds):
            img_id = SPLIT_ID_OFFSET[split] + i + 1
            pixels, objects, captions = synth_image(np.random.default_rng([seed, s, i]), size, kind)
            put_bytes(os.path.join(coco_root, folder, f"{img_id:012d}.jpg"), jpeg_bytes(pixels))
            images.append(dict(id=img_id, file_name=f"{img_id:012d}.jpg", height=size, width=size))
            for k, seg, area, bbox in objects:
                ann_id += 1
                name = VPO_CLASSES[k + 1]
                anns.append(dict(id=ann_id, image_id=img_id, iscrowd=0, segmentation=seg, area=area,
                                 bbox=bbox, category_id=1 if name in PERSONS else CLASS_ID[name]))
            caps += [dict(id=img_id * 10 + j, image_id=img_id, caption=c)
                     for j, c in enumerate(captions)]
        ann_dir = os.path.join(coco_root, "annotations")
        put_bytes(os.path.join(ann_dir, f"instances_{folder}.json"),
                  json.dumps(dict(images=images, annotations=anns, categories=cats)).encode())
        put_bytes(os.path.join(ann_dir, f"captions_{folder}.json"),
                  json.dumps(dict(images=images, annotations=caps)).encode())


def _synth_vggsound(vgg_root, seed):
    """VGGSound-format CSV + 3 s 16 kHz mono clips; every Table 7 label gets clips in both splits."""
    rows = []
    for k, name in enumerate(VPO_CLASSES[1:]):
        labels = VPO_AUDIO_LABELS[name]
        for s, split in enumerate(("train", "test")):
            for i in range(CLIPS_PER_CLASS[split]):
                rng = np.random.default_rng([seed, 1000 + k, s, i])
                ytid, start = f"vpo{k:02d}{split[:2]}{i:04d}", int(rng.integers(0, 300))
                rows.append([ytid, start, labels[i % len(labels)], split])
                put_wav(os.path.join(vgg_root, "audio", f"{ytid}_{start:06d}.wav"),
                        synth_sound(rng, k, int(CLIP_SECONDS * SR)), SR)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    put_bytes(os.path.join(vgg_root, "vggsound.csv"), buf.getvalue().encode())


def make_sources(out, size, n_train, n_test, mi_share, seed):
    """Write the synthetic COCO and VGGSound sources under out/sources/; returns their roots.

    Generates a margin of extra images so that every subset reaches n_train / n_test after the
    person rule and the builder's filters.
    """
    coco_root, vgg_root = os.path.join(out, "sources", "coco"), os.path.join(out, "sources", "vggsound")
    counts = {}
    for split, n in (("train", n_train), ("val", n_test)):
        n_mi = round(n * mi_share)
        counts[split] = (n + max(2, n // 8), n_mi + max(2, n_mi // 4) if n_mi else 0)
    _synth_coco(coco_root, size, counts, seed)
    _synth_vggsound(vgg_root, seed)
    return coco_root, vgg_root


# ---------------------------------------------------------------- CLI
def count(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def positive(text):
    if count(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco", help="COCO 2017 root (annotations/, train2017/, val2017/); real mode")
    p.add_argument("--vggsound", help="VGGSound root (vggsound.csv, audio/{ytid}_{start:06d}.wav); "
                   "real mode")
    p.add_argument("--synthetic", action="store_true",
                   help="built-in mode: write synthetic COCO/VGGSound sources to OUT/sources, then build")
    p.add_argument("--avs-mss", action="store_true",
                   help="AVS-M-SS mode (CAVP Sec. 5.2): AVSBench S4 (--avsbench) with every clip's audio replaced by "
                        "a VGGSound (--vggsound) clip of its category, written to OUT in the S4 layout")
    p.add_argument("--avsbench", help="AVS-M-SS mode: AVSBench root (the folder with Single-source/, or it)")
    p.add_argument("--out", required=True,
                   help="DATA_ROOT to write VPO-SS/, VPO-MS/, VPO-MSMI/, audio/ (AVS-M-SS: Single-source/)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (byte-deterministic)")
    p.add_argument("--workers", type=positive, default=min(8, os.cpu_count() or 1),
                   help="processes writing masks/links (output does not depend on it)")
    for flag, col, what in (("--n-train", 0, "train"), ("--n-test", 1, "val (test)")):
        paper = "/".join(str(PAPER_SIZES[s][col]) for s in SUBSETS)
        p.add_argument(flag, type=count, help=f"{what} samples per subset (default: the paper's "
                       f"{paper} in real mode, {SYNTHETIC_SIZES[col]} synthetic)")
    p.add_argument("--mi-share", type=float, help="share of multi-instance images in VPO-MSMI (default: "
                   f"the paper's {PAPER_MI_SHARE:.3f} in real mode, {SYNTHETIC_MI_SHARE} synthetic)")
    p.add_argument("--mi-single-source", action="store_true",
                   help="multi-instance images of VPO-MSMI sound through one instance of their "
                   "repeated class only, no other class (default: plus 0-4 other sounding classes, "
                   "as VPO-MS); with --mi-share 1 every VPO-MSMI sample is then one sound whose "
                   "instance only stereo can tell")
    p.add_argument("--size", type=int, default=64, help="synthetic image side in pixels (>= 32)")
    p.add_argument("--strict", action="store_true", help="stop with an error when a COCO image listed in the "
                   "annotations, or a whole train2017/ or val2017/ folder, is missing (default: skip it with "
                   "a warning)")
    args = p.parse_args(argv)
    if args.avs_mss and not (args.avsbench and args.vggsound) or args.avsbench and not args.avs_mss:
        p.error("--avs-mss needs --avsbench AVSBENCH_ROOT and --vggsound VGG_ROOT (and --avsbench is for --avs-mss)")
    if args.avs_mss and (args.coco or args.synthetic):
        p.error("--avs-mss builds from AVSBench and VGGSound: drop --coco/--synthetic")
    if args.synthetic and (args.coco or args.vggsound):
        p.error("--synthetic builds its own sources: drop --coco/--vggsound")
    if not (args.synthetic or args.avs_mss) and not (args.coco and args.vggsound):
        p.error("real mode needs both --coco and --vggsound (or use --synthetic)")
    if args.mi_share is not None and not 0.0 <= args.mi_share <= 1.0:
        p.error(f"--mi-share {args.mi_share} is not in [0, 1]")
    if args.size < 32:
        p.error(f"--size {args.size} is too small for the synthetic world; use >= 32")
    return args


def main(argv=None):
    args = parse_args(argv)
    defaults = dict.fromkeys(SUBSETS, SYNTHETIC_SIZES) if args.synthetic else PAPER_SIZES
    sizes = {s: (n_train if args.n_train is None else args.n_train,
                 n_test if args.n_test is None else args.n_test)
             for s, (n_train, n_test) in defaults.items()}
    mi_share = args.mi_share if args.mi_share is not None else (
        SYNTHETIC_MI_SHARE if args.synthetic else PAPER_MI_SHARE)
    t0 = time.monotonic()
    try:
        if args.avs_mss:
            summary = build_avs_mss(args.avsbench, args.vggsound, args.out, args.seed, args.workers)
            text, name = format_avs_mss(summary), "avs_mss_summary.json"
        else:
            coco, vgg = args.coco, args.vggsound
            if args.synthetic:
                print(f"writing synthetic sources to {os.path.join(args.out, 'sources')} ...",
                      file=sys.stderr, flush=True)
                coco, vgg = make_sources(args.out, args.size, *sizes["msmi"], mi_share, args.seed)
            summary = build(coco, vgg, args.out, sizes, mi_share, args.seed, args.workers,
                            args.size if args.synthetic else None, args.strict, args.mi_single_source)
            text, name = format_summary(summary), "vpo_summary.json"
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"wrote {args.out} in {time.monotonic() - t0:.1f} s (summary: {os.path.join(args.out, name)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
