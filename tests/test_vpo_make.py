"""Tests for vpo_make.py on a tiny hand-written COCO + VGGSound fixture and on the built-in world."""
import contextlib
import csv
import io
import json
import os
import shutil
import struct
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import vpo_make
from conftest import TINY_ARGS
from data import VPO_AUDIO_LABELS, DataError, LogMel, VPODataset, decode_coco, write_wav

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")  # numpy 2 notice
H, W = 30, 48
SIZES = {s: (10, 10) for s in vpo_make.SUBSETS}
CATEGORY = dict(vpo_make.CLASS_ID, person=1, giraffe=25)


def rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def disc(cx, cy, r):
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def rle(mask, compressed=True):
    if compressed:
        return {"size": [H, W],
                "counts": mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()}
    flat = mask.flatten(order="F").astype(int)
    edges = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    return {"size": [H, W], "counts": ([0] if flat[0] else []) + np.diff(edges).tolist()}


# (image id, [(ann id, category, segmentation, iscrowd)], captions); persons follow the captions
IMAGES = {
    "train": [
        (11, [(101, "dog", rect(2, 5, 12, 20), 0), (102, "cat", rle(disc(20, 10, 4)), 0),
              (103, "car", rle(disc(32, 20, 5), False), 0), (104, "person", rect(40, 2, 46, 28), 0)],
         ["A man walking his dog.", "a guy with a cat and a car"]),
        (12, [(201, "dog", rect(2, 5, 12, 20), 0), (202, "dog", rect(36, 5, 46, 20), 0),
              (203, "bird", rle(disc(24, 24, 3)), 0), (204, "dog", rle(disc(23, 7, 4), False), 1)],
         ["two dogs and a bird", "dogs in a park"]),
        (13, [(301, "person", rect(2, 2, 10, 25), 0), (302, "person", rect(12, 2, 20, 25), 0),
              (303, "horse", rect(24, 5, 34, 25), 0), (304, "sheep", rle(disc(41, 15, 5)), 0)],
         ["a man and a woman riding a horse", "people with sheep"]),
        (14, [(401, "person", rect(5, 5, 15, 25), 0), (402, "elephant", rect(25, 5, 45, 25), 0)],
         ["a toddler next to an elephant", "an infant and a baby elephant"]),
        (15, [(501, "person", rect(3, 3, 9, 27), 0), (502, "cow", rect(15, 8, 30, 22), 0),
              (503, "giraffe", rect(35, 2, 45, 28), 0)], ["a woman milking a cow near a giraffe"]),
        (16, [(601, "person", rect(2, 4, 9, 28), 0), (602, "person", rect(38, 4, 45, 28), 0),
              (603, "bus", rect(15, 10, 32, 22), 0)], ["two men waiting for a bus"]),
        (17, [(701, "giraffe", rect(10, 5, 30, 25), 0)], ["a giraffe"]),
        (18, [(801, "person", rect(30, 3, 38, 27), 0), (802, "elephant", rle(disc(12, 15, 8)), 0)],
         ["a man next to a baby elephant"]),
    ],
    "val": [
        (21, [(2101, "person", rect(2, 2, 10, 28), 0), (2102, "dog", rect(14, 10, 26, 24), 0),
              (2103, "cat", rle(disc(38, 15, 6), False), 0)], ["a girl with her dog and cat"]),
        (22, [(2201, "cat", rect(2, 8, 12, 20), 0), (2202, "cat", rect(35, 8, 45, 20), 0),
              (2203, "mouse", rle(disc(24, 24, 2)), 0)], ["two cats chasing a mouse"]),
        (23, [(2301, "zebra", rect(4, 6, 20, 24), 0), (2302, "horse", rect(28, 6, 44, 24), 0)],
         ["a zebra and a horse"]),
    ],
}
SINGLE = {11, 13, 14, 15, 18, 21, 23}
MULTI = {12, 16, 22}
AMBIGUOUS_PERSONS = {301, 302}
CROWDS = {204}


def write_coco(root):
    cats = [{"id": i, "name": n} for n, i in sorted(CATEGORY.items())]
    rng = np.random.default_rng(0)
    for split, folder, _ in vpo_make.SPLITS:
        images, anns, caps = [], [], []
        for img_id, objs, captions in IMAGES[split]:
            name = f"{img_id:012d}.jpg"
            os.makedirs(os.path.join(root, folder), exist_ok=True)
            pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, folder, name))
            images.append(dict(id=img_id, file_name=name, height=H, width=W))
            anns += [dict(id=a, image_id=img_id, category_id=CATEGORY[c], segmentation=seg, iscrowd=crowd,
                          area=1.0, bbox=[0, 0, 1, 1]) for a, c, seg, crowd in objs]
            caps += [dict(id=img_id * 10 + j, image_id=img_id, caption=c) for j, c in enumerate(captions)]
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        for kind, data in (("instances", dict(images=images, annotations=anns, categories=cats)),
                           ("captions", dict(images=images, annotations=caps))):
            with open(os.path.join(root, "annotations", f"{kind}_{folder}.json"), "w") as f:
                json.dump(data, f)


def write_vggsound(root):
    """One train and one test clip (0.25 s tone) per Table 7 label, a listed-but-missing clip and
    a row of a label outside Table 7."""
    rows = []
    t = np.arange(4000) / 16000
    os.makedirs(os.path.join(root, "audio"))
    labels = sorted(lab for labs in VPO_AUDIO_LABELS.values() for lab in labs)
    for i, label in enumerate(labels):
        for split in ("train", "test"):
            rows.append([f"yt{i:02d}{split}", 7, label, split])
            write_wav(os.path.join(root, "audio", f"yt{i:02d}{split}_000007.wav"),
                      0.5 * np.sin(2 * np.pi * (200 + 20 * i) * t))
    rows += [["missing0001", 3, "dog barking", "train"], ["other000001", 5, "people marching", "train"]]
    with open(os.path.join(root, "vggsound.csv"), "w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    coco, vgg = str(root / "coco"), str(root / "vggsound")
    write_coco(coco)
    write_vggsound(vgg)
    return coco, vgg


def build(src, out, workers=1, seed=0, strict=False):
    return vpo_make.build(*src, str(out), SIZES, 0.5, seed, workers, strict=strict)


@pytest.fixture(scope="module")
def built(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    return str(out), build(src, out)


def tree(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


def rows(out, subset):
    with open(os.path.join(out, vpo_make.VPO_SUBSETS[subset], f"vpo_{subset}_data_stereo.csv")) as f:
        return list(csv.DictReader(f))


def by_image(out, subset):
    groups = defaultdict(list)
    for r in rows(out, subset):
        groups[int(r["img_Id"])].append(r)
    return groups


def ann_id(row):
    return int(row["ann_Ids"].strip("[]"))


@pytest.fixture(scope="module")
def cocos(src):
    with contextlib.redirect_stdout(io.StringIO()):
        return {split: COCO(os.path.join(src[0], "annotations", f"instances_{folder}.json"))
                for split, folder, _ in vpo_make.SPLITS}


def test_masks_equal_pycocotools(built, cocos):
    out, _ = built
    for subset in vpo_make.SUBSETS:
        d = os.path.join(out, vpo_make.VPO_SUBSETS[subset])
        for img_id, group in by_image(out, subset).items():
            coco = cocos[group[0]["split"]]
            if subset == "ss":
                (r,) = group
                path = os.path.join(d, "mask", r["cateName"], f"{img_id:012d}_{ann_id(r):012d}.png")
            else:
                path = os.path.join(d, "mask", f"{img_id:012d}.png")
            expected = np.zeros((H, W), np.uint8)
            sounding = {int(r["cateId"]) for r in group}
            for a in coco.imgToAnns[img_id]:
                if a["iscrowd"] and a["category_id"] in sounding:
                    expected[coco.annToMask(a) > 0] = 255
            for r in group:
                expected[coco.annToMask(coco.anns[ann_id(r)]) > 0] = int(r["cateId"])
            got = np.array(Image.open(path))
            assert got.ndim == 2 and np.array_equal(got, expected), path
    crowd = np.array(Image.open(os.path.join(out, "VPO-MSMI", "mask", f"{12:012d}.png"))) == 255
    assert crowd.any(), "the crowd region of the sounding dog class is ignored (255)"


def test_audio_pos_is_centre_of_mass(built, cocos):
    out, _ = built
    for subset in vpo_make.SUBSETS:
        for r in rows(out, subset):
            xs = np.nonzero(cocos[r["split"]].annToMask(cocos[r["split"]].anns[ann_id(r)]))[1]
            assert float(r["audio_pos"]) == pytest.approx((xs.mean() + 0.5) / W, abs=1e-6)


def test_membership_rules(built):
    out, summary = built
    ss, ms, msmi = (by_image(out, s) for s in vpo_make.SUBSETS)
    assert all(len(g) == 1 for g in ss.values()) and set(ss) == SINGLE  # one sounding class per sample
    assert set(ms) == SINGLE  # no image with a repeated class in MS
    for g in ms.values():
        assert len({r["cateId"] for r in g}) == len(g) <= vpo_make.MAX_SOURCES
    assert len(ms[11]) < 4, "image 11 has 4 objects: some must be silenced"
    # images with a repeated class: in MSMI only, flagged multi_instance
    assert {i for i, g in msmi.items() if g[0]["multi_instance"] == "1"} == MULTI
    for i in SINGLE:
        assert [{k: v for k, v in r.items() if k != "multi_instance"} for r in msmi[i]] == ms[i]
        assert all(r["multi_instance"] == "0" for r in msmi[i])
    assert Counter(r["cateName"] for r in msmi[12])["dog"] == 1  # one of the twin dogs sounds
    assert Counter(r["cateName"] for r in msmi[16])["male"] == 1
    every = [r for s in vpo_make.SUBSETS for r in rows(out, s)]
    assert not {ann_id(r) for r in every} & (CROWDS | AMBIGUOUS_PERSONS)
    persons = {ann_id(r): r["cateName"] for r in every if r["cateName"] in vpo_make.PERSONS}
    expected = {104: "male", 401: "baby", 501: "female", 601: "male", 602: "male", 801: "male",
                2101: "female"}
    assert persons.items() <= expected.items() and persons
    assert {r["split"] for r in every} == {"train", "val"}
    assert summary["persons"] == dict(male=3, female=2, baby=1, ambiguous=1)
    assert summary["vggsound"]["clips_missing"] == 1
    assert summary["subsets"]["msmi"]["train"]["multi_instance"] == 2


@pytest.mark.parametrize("captions, expected", [
    (["A man riding a horse."], "male"), (["two boys", "a guy"], "male"),
    (["Two women talking", "ladies at lunch"], "female"), (["a baby in a crib"], "baby"),
    (["an infant", "a toddler"], "baby"), (["a man and a woman"], None), (["a girl and her dad"], None),
    (["people on a bench"], None), ([], None), (["a woman feeding a baby elephant"], "female"),
    (["baby giraffes", "a snowman"], None),
])
def test_person_rule(captions, expected):
    assert vpo_make.person_class(captions) == expected


def test_deterministic_for_any_worker_count(src, built, tmp_path):
    out, _ = built
    build(src, tmp_path / "w2", workers=2)
    assert tree(tmp_path / "w2") == tree(out)
    build(src, tmp_path / "seed1", seed=1)
    assert tree(tmp_path / "seed1") != tree(out)


def test_rerun_rewrites_nothing(src, built):
    out, _ = built
    before = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in tree(out)}
    content = tree(out)
    build(src, out, workers=2)
    assert {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in tree(out)} == before
    assert tree(out) == content


def test_interrupted_run_resumes(src, built, tmp_path, monkeypatch):
    out, ref = tmp_path / "resume", tree(built[0])
    real, calls = vpo_make.write_mask, []

    def interrupted(*args):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(vpo_make, "write_mask", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(src, out)
    assert not list(out.rglob("*.csv")) and not list(out.rglob("*.tmp")), "CSVs last, no temp files"
    monkeypatch.undo()
    build(src, out)
    assert tree(out) == ref
    for rel in ("VPO-MS/vpo_ms_data_stereo.csv", "VPO-MSMI/mask/000000000012.png", "vpo_summary.json",
                "audio/" + rows(str(out), "ss")[0]["vgg_file"] + ".wav"):
        os.remove(out / rel)
    build(src, out)
    assert tree(out) == ref


def _remove(path):
    os.remove(path)
    return path


def _corrupt(path):
    with open(path, "wb") as f:
        f.write(b"not a wav file")
    return path


def _used_clip(built, vgg, i=0):
    return os.path.join(vgg, "audio", rows(built[0], "ss")[i]["vgg_file"] + ".wav")


def _edit_csv(vgg, edit):
    """Rewrite vggsound.csv as edit(rows)."""
    path = os.path.join(vgg, "vggsound.csv")
    with open(path) as f:
        table = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(edit(table))
    return path


def _keep_labels(vgg, keep):
    _edit_csv(vgg, lambda table: [r for r in table if keep(r[2])])


def _append_bad_row(vgg):
    path = _edit_csv(vgg, lambda table: table + [["x", "soon", "dog barking", "train"]])
    return f"{path}:{len(AUDIO_ROWS) + 3}:"


def _rename_clips(vgg, ext, names=None):
    audio = os.path.join(vgg, "audio")
    for name in names or os.listdir(audio):
        os.rename(os.path.join(audio, name), os.path.join(audio, name[:-4] + ext))
    return ext


AUDIO_ROWS = [lab for labs in VPO_AUDIO_LABELS.values() for lab in labs for _ in ("train", "test")]
BAD_INPUTS = {  # name -> mutate(coco, vgg, built) returning what the error message must contain
    "no instances": lambda c, v, b: _remove(os.path.join(c, "annotations", "instances_val2017.json")),
    "no captions": lambda c, v, b: _remove(os.path.join(c, "annotations", "captions_train2017.json")),
    "bad json": lambda c, v, b: _corrupt(os.path.join(c, "annotations", "instances_train2017.json")),
    "no image folder": lambda c, v, b: [shutil.rmtree(os.path.join(c, d)) for d in ("train2017", "val2017")]
    and "neither train2017/ nor val2017/ found",
    "no image (strict)": lambda c, v, b: _remove(image_path(c, 11)),
    "no train2017 (strict)": lambda c, v, b: shutil.rmtree(os.path.join(c, "train2017"))
    or "train2017 not found",
    "no vggsound.csv": lambda c, v, b: _remove(os.path.join(v, "vggsound.csv")),
    "bad csv row": lambda c, v, b: _append_bad_row(v),
    "only flac clips": lambda c, v, b: _rename_clips(v, ".flac") and "convert them to WAV: for f in",
    "nothing to build": lambda c, v, b: _keep_labels(v, lambda lab: "airplane" in lab)
    or "nothing to build: no COCO image on disk",
}


def image_path(coco, img_id):
    return os.path.join(coco, "train2017", f"{img_id:012d}.jpg")


def _copy(src, tmp_path):
    return str(shutil.copytree(src[0], tmp_path / "coco")), str(shutil.copytree(src[1], tmp_path / "vgg"))


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_raises_one_line_data_error(name, src, built, tmp_path):
    coco, vgg = _copy(src, tmp_path)
    expected = BAD_INPUTS[name](coco, vgg, built)
    with pytest.raises(DataError) as e:
        build((coco, vgg), tmp_path / "out", strict=name.endswith("(strict)"))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_cli_prints_error_and_exits_2(tmp_path, capsys):
    assert vpo_make.main(["--coco", str(tmp_path), "--vggsound", str(tmp_path),
                          "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "train2017" in err
    with pytest.raises(SystemExit):
        vpo_make.main(["--synthetic", "--coco", str(tmp_path), "--out", str(tmp_path)])


# ---------------------------------------------------------------- partial and real-world inputs
def warnings(err):
    return [line for line in err.splitlines() if line.startswith(("warning: ", "note: "))]


def sources(out):
    """Every CSV row without its clip: (subset, image, ann ids, class, split, audio_pos)."""
    return {(s, r["img_Id"], r["ann_Ids"], r["cateName"], r["split"], r["audio_pos"])
            for s in vpo_make.SUBSETS for r in rows(out, s)}


def test_labels_without_clips_warn(src, built, tmp_path, capsys):
    coco, vgg = _copy(src, tmp_path)
    _keep_labels(vgg, lambda lab: lab not in ("airplane", "airplane flyby", "dog baying"))
    summary = build((coco, vgg), tmp_path / "out")
    audio = os.path.join(vgg, "audio")
    assert warnings(capsys.readouterr().err)[1:] == [
        f"warning: VGGSound label 'dog baying' has no usable clip in {audio}; "
        "class dog uses its other labels",
        "warning: class airplane has no usable VGGSound clip ('airplane', 'airplane flyby'); its objects are "
        "silent (background, never a source) in 0 images"]
    assert summary["missing"] == dict(labels=["airplane", "airplane flyby", "dog baying"],
                                      classes={"airplane": 0}, coco_splits=[], coco_images=0)
    assert sources(str(tmp_path / "out")) == sources(built[0])  # no airplane in the images


def test_class_without_clips_is_silent(src, built, tmp_path, capsys):
    coco, vgg = _copy(src, tmp_path)
    _keep_labels(vgg, lambda lab: lab not in VPO_AUDIO_LABELS["dog"])
    out = str(tmp_path / "out")
    assert vpo_make.main(["--coco", coco, "--vggsound", vgg, "--out", out, "--n-train", "10",
                          "--n-test", "10", "--mi-share", "0.5", "--workers", "1"]) == 0
    printed = capsys.readouterr()
    labels = ", ".join(map(repr, VPO_AUDIO_LABELS["dog"]))
    assert (f"warning: class dog has no usable VGGSound clip ({labels}); its objects are silent "
            "(background, never a source) in 3 images") in warnings(printed.err)
    assert "silent classes (no clip; objects are background): dog in 3 images" in printed.out.splitlines()
    every = [r for s in vpo_make.SUBSETS for r in rows(out, s)]
    assert every and "dog" not in {r["cateName"] for r in every}
    ss, msmi = by_image(out, "ss"), by_image(out, "msmi")
    assert set(ss) == SINGLE | {12}, "without its dogs image 12 has one bird: single-instance"
    assert {i for i, g in msmi.items() if g[0]["multi_instance"] == "1"} == MULTI - {12}
    for i in (11, 21):
        mask = np.array(Image.open(os.path.join(out, "VPO-MS", "mask", f"{i:012d}.png")))
        assert vpo_make.CLASS_ID["dog"] not in mask
    with open(os.path.join(out, "vpo_summary.json")) as f:
        assert json.load(f)["missing"]["classes"] == {"dog": 3}


def test_missing_coco_image_is_skipped(src, built, tmp_path, capsys):
    coco, vgg = _copy(src, tmp_path)
    os.remove(image_path(coco, 11))
    summary = build((coco, vgg), tmp_path / "out")
    inst, image = os.path.join(coco, "annotations", "instances_train2017.json"), image_path(coco, 11)
    assert warnings(capsys.readouterr().err)[0] == (
        f"warning: 1 of 8 images listed in {inst} are not on disk (first: {image}); skipped them "
        "(pass --strict to stop instead)")
    assert summary["missing"]["coco_images"] == 1
    assert {s for s in sources(built[0]) if s[1] != "11"} == sources(str(tmp_path / "out"))


def test_coco_root_with_only_val2017(src, built, tmp_path, capsys):
    coco, vgg = _copy(src, tmp_path)
    shutil.rmtree(os.path.join(coco, "train2017"))
    os.remove(os.path.join(coco, "annotations", "instances_train2017.json"))  # not needed either
    summary = build((coco, vgg), tmp_path / "out")
    assert warnings(capsys.readouterr().err)[0] == (
        f"warning: {os.path.join(coco, 'train2017')} not found; skipped the VPO train split (pass --strict "
        "to stop instead)")
    assert summary["missing"]["coco_splits"] == ["train2017"]
    assert all(e["train"]["samples"] == 0 < e["val"]["samples"] for e in summary["subsets"].values())
    assert sources(str(tmp_path / "out")) == {s for s in sources(built[0]) if s[4] == "val"}


@pytest.mark.parametrize("header, order", [
    (["# YouTube ID", "start seconds", "label", "train/test split", "duration"], [0, 1, 2, 3]),
    (["label", "split", "youtube_id", "start_seconds"], [2, 3, 0, 1]),
])
def test_vggsound_csv_with_header_and_extra_columns(src, built, tmp_path, capsys, header, order):
    coco, vgg = _copy(src, tmp_path)
    path = _edit_csv(vgg, lambda table: [header] + [[r[order.index(i)] for i in range(4)] + ["10"] * (
        len(header) - 4) for r in table])
    build((coco, vgg), tmp_path / "out")
    columns = ",".join(str(i + 1) for i in order)
    assert warnings(capsys.readouterr().err)[0] == (
        f"note: {path}: header row {','.join(header)!r} skipped, {len(header)} columns; reading "
        f"youtube_id,start_seconds,label,split from columns {columns}")
    assert tree(tmp_path / "out") == tree(built[0])


def test_non_wav_clips_are_skipped_with_the_conversion(src, built, tmp_path, capsys):
    coco, vgg = _copy(src, tmp_path)
    flac, mp4, bad = (_used_clip(built, vgg, i) for i in range(3))
    _rename_clips(vgg, ".flac", [os.path.basename(flac)])
    _rename_clips(vgg, ".mp4", [os.path.basename(mp4)])
    _corrupt(bad)
    summary = build((coco, vgg), tmp_path / "out")
    audio = os.path.join(vgg, "audio")
    assert warnings(capsys.readouterr().err)[1:3] == [
        f"warning: 2 listed clips are in {audio} as .flac/.mp4, not WAV; skipped them; convert them to WAV: "
        f'for f in {audio}/*.{{flac,mp4}}; do ffmpeg -nostdin -loglevel error -i "$f" -vn -ac 1 -ar 16000 '
        '-c:a pcm_s16le "${f%.*}.wav"; done',
        f"warning: 1 clips in {audio} are not readable WAV (first: {os.path.basename(bad)}); skipped them; "
        "re-encode each as 16-bit PCM: ffmpeg -i IN -vn -ac 1 -ar 16000 -c:a pcm_s16le OUT.wav"]
    assert (summary["vggsound"]["clips_not_wav"], summary["vggsound"]["clips_unreadable"]) == (2, 1)
    used = {r["vgg_file"] for s in vpo_make.SUBSETS for r in rows(str(tmp_path / "out"), s)}
    assert not used & {os.path.basename(p)[:-4] for p in (flac, mp4, bad)}
    assert {s[:5] for s in sources(str(tmp_path / "out"))} == {s[:5] for s in sources(built[0])}


def test_wav_ok(tmp_path):
    """PCM and float WAVs with samples are usable clips; empty, corrupt and absent ones are not."""
    pcm, empty, float32, junk = (str(tmp_path / f"{name}.wav") for name in ("pcm", "empty", "float", "junk"))
    write_wav(pcm, np.zeros(100))
    write_wav(empty, np.zeros(0))
    data = np.full(100, 0.25, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)  # IEEE float, mono, 32 bit
    with open(float32, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 20 + len(fmt) + len(data)) + b"WAVEfmt "
                + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)
    _corrupt(junk)
    paths = (pcm, empty, float32, junk, str(tmp_path / "absent.wav"))
    assert [vpo_make.wav_ok(p) for p in paths] == [True, False, True, False, False]


def _check_stereo(ds):
    """Single-source samples: right-channel share of |wave| equals audio_pos (the panning of
    CAVP Sec. 3)."""
    checked = 0
    for i in range(len(ds)):
        x = ds[i]
        if x["audio_pos"] >= 0:
            left, right = x["wave"].abs().sum(1)
            assert float(right / (left + right)) == pytest.approx(float(x["audio_pos"]), abs=1e-4)
            checked += 1
    return checked


def test_vpodataset_reads_build(built):
    out, _ = built
    checked = 0
    for subset in vpo_make.SUBSETS:
        for split in ("train", "test"):
            ds = VPODataset(out, subset, split)
            n = len({(r["img_Id"], r["ann_Ids"] if subset == "ss" else "")
                     for r in rows(out, subset) if (r["split"] == "train") == (split == "train")})
            assert len(ds) == n
            checked += _check_stereo(ds)
    assert checked > 0


def test_tiny_vpo_builtin(tiny_vpo):
    with open(os.path.join(tiny_vpo, "vpo_summary.json")) as f:
        summary = json.load(f)
    for subset, e in summary["subsets"].items():
        assert (e["train"]["samples"], e["val"]["samples"]) == (8, 4), subset
        for split in ("train", "test"):
            ds = VPODataset(tiny_vpo, subset, split)
            assert ds[0]["image"].shape == (3, 64, 64) and ds[0]["wave"].shape == (2, 48000)
            _check_stereo(ds)
    msmi = summary["subsets"]["msmi"]
    assert (msmi["train"]["multi_instance"], msmi["val"]["multi_instance"]) == (4, 2)
    assert any(r["multi_instance"] == "1" and not 0.4 < float(r["audio_pos"]) < 0.6
               for r in rows(tiny_vpo, "msmi"))


def test_tiny_vpo_rerun_rewrites_nothing(tiny_vpo):
    before = {p: os.stat(os.path.join(tiny_vpo, p)).st_mtime_ns for p in tree(tiny_vpo)}
    assert vpo_make.main(["--synthetic", "--out", tiny_vpo] + TINY_ARGS) == 0
    assert {p: os.stat(os.path.join(tiny_vpo, p)).st_mtime_ns for p in tree(tiny_vpo)} == before


def test_synthetic_world():
    """Persons of every caption kind, polygon and RLE masks, no overlaps, twins at opposite sides."""
    kinds, seg_types = set(), set()
    for i in range(80):
        kind = "multi" if i % 2 else "single"
        _, objects, captions = vpo_make.synth_image(np.random.default_rng([7, i]), 64, kind)
        masks = [decode_coco(seg, 64, 64).astype(int) for _, seg, _, _ in objects]
        assert max(sum(masks).max(), 1) == 1 and [m.sum() for m in masks] == [a for *_, a, _ in objects]
        seg_types |= {type(seg).__name__ for _, seg, _, _ in objects}
        if any(vpo_make.VPO_CLASSES[k + 1] in vpo_make.PERSONS for k, *_ in objects):
            kinds.add(vpo_make.person_class(captions))
        if kind == "multi":
            alpha = [(np.nonzero(m)[1].mean() + 0.5) / 64 for m in masks[:2]]
            assert objects[0][0] == objects[1][0] and alpha[0] < 0.4 and alpha[1] > 0.6
    assert kinds == {"male", "female", "baby", None} and seg_types == {"list", "dict"}


def test_synthetic_sounds_are_separable():
    """Mean log-mel (data.LogMel) of a clip is nearest to another clip of its own class."""
    mel = LogMel()
    feats = torch.stack([mel(torch.tensor(vpo_make.synth_sound(np.random.default_rng([k, j]), k, 16000),
                                          dtype=torch.float32)[None, None])[0, 0].mean(0)
                         for k in range(21) for j in range(2)])
    dist = torch.cdist(feats, feats) + torch.eye(len(feats)) * 1e9
    assert torch.equal(dist.argmin(1) // 2, torch.arange(len(feats)) // 2)


def test_mi_single_source_subset(src, cocos, tmp_path, capsys):
    """--mi-share 1 --mi-single-source (benchmarks/stereo_probe.sh), sizes that the fixture's
    multi-instance images fill (2 train, 1 val): VPO-MSMI holds them only, each sounding through one
    instance of its repeated class; its twins and the other classes are silent, so the mask holds
    that instance alone."""
    out = str(tmp_path / "out")
    assert vpo_make.main(["--coco", src[0], "--vggsound", src[1], "--out", out, "--n-train", "2", "--n-test",
                          "1", "--mi-share", "1", "--mi-single-source", "--workers", "1"]) == 0
    capsys.readouterr()
    msmi = by_image(out, "msmi")
    assert set(msmi) == MULTI
    repeated = {12: "dog", 16: "male", 22: "cat"}
    for img_id, group in msmi.items():
        (r,) = group
        assert r["multi_instance"] == "1" and r["cateName"] == repeated[img_id]
        coco = cocos[r["split"]]
        ann = coco.anns[ann_id(r)]
        twins = [a for a in coco.imgToAnns[img_id] if a["category_id"] == ann["category_id"] and not a["iscrowd"]]
        assert len(twins) == 2 and ann in twins
        mask = np.array(Image.open(os.path.join(out, "VPO-MSMI", "mask", f"{img_id:012d}.png")))
        assert np.array_equal(np.isin(mask, (0, 255)), coco.annToMask(ann) == 0)
    with open(os.path.join(out, "vpo_summary.json")) as f:
        summary = json.load(f)
    assert summary["mi_single_source"] is True and summary["mi_share"] == 1
    assert summary["subsets"]["msmi"]["train"]["multi_instance"] == summary["subsets"]["msmi"]["train"]["samples"]
