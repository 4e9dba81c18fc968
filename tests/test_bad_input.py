"""Damaged AVSBench and VPO downloads on fixtures in the released layouts: each fault is one DataError line
naming the file (or flag) before training starts, never a traceback, silent training or a lost run."""
import json
import os
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

import cavp
import data
import fixtures_layouts as fl
import tpavi

S4 = [("a", "dog_barking", "train"), ("b", "race_car", "train"), ("v", "race_car", "val"),
      ("t", "dog_barking", "test")]
MS3 = [("m1", "train"), ("m2", "train"), ("mv", "val"), ("mt", "test")]
AVSS = [("s1", "v1s", "train", 3), ("w1", "v2", "train", 70), ("sv", "v1s", "val", 3), ("mt", "v1m", "test", 15)]
SCRIPT_ARGS = ["--epochs", "1", "--max-iters", "1", "--limit", "8", "--workers", "0", "--backbone", "resnet18",
               "--pretrained", "none", "--batch-size", "2"]


def raises_naming(path, match=""):
    """DataError whose single-line message names `path` (then matches `match`)."""
    return pytest.raises(data.DataError, match=re.escape(os.fspath(path)) + match)


def one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


@pytest.fixture
def s4(tmp_path):
    fl.write_s4(str(tmp_path), S4)
    return tmp_path, tmp_path / "Single-source"


@pytest.fixture
def ms3(tmp_path):
    fl.write_ms3(str(tmp_path), MS3)
    return tmp_path, tmp_path / "Multi-sources"


@pytest.fixture
def avss(tmp_path):
    return tmp_path, pathlib.Path(fl.write_avss(str(tmp_path), AVSS))


def s4_file(base, kind, name, i, split, cat):
    return base / "s4_data" / kind / split / cat / name / f"{name}_{i}.png"


def vpo_ss(root):
    mask = np.zeros((fl.H, fl.W), np.uint8)
    mask[:, :8] = 18
    return fl.write_vpo(str(root), "ss", [
        dict(img=1, split="train", mask=mask, sources=[("dog", 18, 9, "dog1", 0.4, 0.3)]),
        dict(img=2, split="train", mask=mask, sources=[("dog", 18, 11, "dog2", 0.4, 0.3)]),
        dict(img=3, split="val", mask=mask, sources=[("dog", 18, 12, "dog3", 0.4, 0.3)])])


def truncate(path, keep):
    """Cut a WAV to its 44-byte header plus `keep` of its data (the header still claims the whole clip)."""
    raw = path.read_bytes()
    path.write_bytes(raw[:44 + int(keep * (len(raw) - 44)) // 4 * 4])


def rewrite_csv(path, edit):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


# ----------------------------------------------------------------------------- 1-2: truncated WAVs
def test_1_wav_cut_to_its_header(s4, ms3):
    """S4 (8 kHz, resampled) and MS3 (16 kHz) clips cut to their 44-byte header: one line at start-up, for the
    readers of both scripts (AVSBenchFrames for cavp.py, AVSBenchDataset for tpavi.py)."""
    root, base = s4
    wav = base / "s4_data/audio_wav/train/dog_barking/a.wav"
    truncate(wav, 0)
    for make in (data.AVSBenchFrames, data.AVSBenchDataset):
        with raises_naming(wav, ": WAV truncated: it holds 0 of the 40000 samples") as e:
            make(root, "s4", "train")
        one_line(e)
    wav = root / "Multi-sources/ms3_data/audio_wav/test/mt.wav"
    truncate(wav, 0)
    with raises_naming(wav, ": WAV truncated: it holds 0 of the 80000 samples"):
        data.AVSBenchDataset(root, "ms3", "test")
    with raises_naming(wav, ": WAV truncated"):  # and on a read of a file damaged after start-up
        data.load_clip(wav)


def test_2_wav_cut_to_half_its_data(s4, tmp_path):
    """Half the data, the header claiming 5 s: an error, not 2.5 s repeat-padded with the clip's start (S4 and
    the VPO reader). A clip whose header says it is short is the release's short clip: repeat-padded."""
    root, base = s4
    wav = base / "s4_data/audio_wav/test/dog_barking/t.wav"
    truncate(wav, 0.5)
    with raises_naming(wav, ": WAV truncated: it holds 20000 of the 40000 samples.*re-download"):
        data.AVSBenchFrames(root, "s4", "test")
    vpo = tmp_path / "vpo"
    vpo_ss(vpo)
    wav = vpo / "audio/dog3.wav"
    truncate(wav, 0.5)
    with raises_naming(wav, ": WAV truncated"):
        data.VPODataset(vpo, "ss", "test")
    fl.dc_wav(str(wav), 0.2, seconds=1.5)
    assert data.VPODataset(vpo, "ss", "test")[0]["wave"].shape == (2, 48000)


# ----------------------------------------------------------------------------- 3: frame size != mask size
def test_3_frame_size_differs_from_its_mask(s4, avss, tmp_path):
    """A mask or frame of another size: S4 resized to 224 (both scripts) and AVSS at 224 (tpavi.py) or original
    size (cavp.py) stop at start-up (AVSS train: on the first read), naming the files, with no Python argument
    in the message; the VPO reader likewise."""
    root, base = s4
    mask = s4_file(base, "gt_masks", "t", 2, "test", "dog_barking")
    Image.new("L", (40, 30)).save(mask)
    for make in (data.AVSBenchFrames, data.AVSBenchDataset):
        with raises_naming(mask, r": mask size 40x30 differs from the 30x20 of its frame ") as e:
            make(root, "s4", "test", size=224)
        frame = s4_file(base, "visual_frames", "t", 2, "test", "dog_barking")
        assert str(frame) in one_line(e) and "size=" not in str(e.value)
    frame = s4_file(base, "visual_frames", "a", 3, "train", "dog_barking")  # S4 train: frame 3 has no mask
    Image.new("RGB", (40, 30)).save(frame)
    with raises_naming(frame, ": frame size 40x30 differs from the 30x20 of "):
        data.AVSBenchDataset(root, "s4", "train", size=224)
    root, base = avss
    for frame in (base / "v1m/mt/frames/3.jpg", base / "v2/w1/frames/7.jpg"):  # a test and a train frame
        Image.new("RGB", (20, 12)).save(frame)
    with raises_naming(base / "v1m/mt/frames/3.jpg", ": frame size 20x12 differs from the 18x12 of "):
        data.AVSBenchDataset(root, "avss", "test", size=224)
    with raises_naming(base / "v1m/mt/frames/3.jpg"):
        data.AVSBenchFrames(root, "avss", "test", size=None)
    train = data.AVSBenchDataset(root, "avss", "train", size=224)
    with raises_naming(frame, ": frame size 20x12 differs from the 18x12 of "):
        train[1]
    vpo = tmp_path / "vpo"
    vpo_ss(vpo)
    mask = vpo / "VPO-SS/mask/dog/000000000003_000000000012.png"
    Image.fromarray(np.zeros((fl.H + 1, fl.W), np.uint8)).save(mask)
    with raises_naming(mask, r": mask size \(17, 24\) != image size \(16, 24\)"):
        data.VPODataset(vpo, "ss", "test")


# ----------------------------------------------------------------------------- 4: mask values outside the labels
def test_4_mask_values_outside_the_label_set(s4, ms3, tmp_path):
    """A 7 in a grey binary S4 mask, palette index 7 in an MS3 mask (palette entries 0 and 1): one line at
    start-up, in any split; a VPO test mask likewise."""
    root, base = s4
    mask = s4_file(base, "gt_masks", "t", 1, "test", "dog_barking")  # grey 'L', 0 / 255
    m = np.asarray(Image.open(mask)).copy()
    m[0, 0] = 7
    Image.fromarray(m).save(mask)
    with raises_naming(mask, ": mask value 7 is not an AVSBench-Objects level") as e:
        data.AVSBenchFrames(root, "s4", "test")
    one_line(e)
    root, base = ms3
    for split, name in (("test", "mt"), ("train", "m1")):
        mask = base / f"ms3_data/gt_masks/{split}/{name}/{name}_2.png"
        im = Image.open(mask)
        m = np.asarray(im).copy()
        m[0, 0] = 7
        out = Image.fromarray(m, "P")
        out.putpalette(im.getpalette())
        out.save(mask)
    with raises_naming(mask.parents[2] / "test/mt/mt_2.png", ": palette index 7 is not an AVSBench-Objects label"):
        data.AVSBenchDataset(root, "ms3", "test")
    with raises_naming(mask, ": palette index 7"):
        data.AVSBenchFrames(root, "ms3", "train")
    vpo = tmp_path / "vpo"
    vpo_ss(vpo)
    mask = vpo / "VPO-SS/mask/dog/000000000003_000000000012.png"
    Image.fromarray(np.full((fl.H, fl.W), 7, np.uint8)).save(mask)
    with raises_naming(mask, ": mask value 7 is not a VPO COCO class id"):
        data.VPODataset(vpo, "ss", "test")


# ----------------------------------------------------------------------------- 5: unknown split names
def test_5_unknown_split_name(s4, ms3):
    """An MS3 clip marked 'training' is not dropped (cavp.py trained on 3 clips of 4); S4 names the split
    instead of a batch-size error."""
    root, base = ms3
    csv_path = base / "ms3_meta_data.csv"
    rewrite_csv(csv_path, lambda lines: [re.sub(r"^m2,train$", "m2,training", x) for x in lines])
    with raises_naming(csv_path, ": split 'training' of clip m2 is not train, val or test") as e:
        data.AVSBenchFrames(root, "ms3", "train")
    one_line(e)
    root, base = s4
    csv_path = base / "s4_meta_data.csv"
    rewrite_csv(csv_path, lambda lines: [x.replace(",train", ",Train") for x in lines])
    with raises_naming(csv_path, ": split 'Train' of clip a "):
        data.AVSBenchDataset(root, "s4", "train")


# ----------------------------------------------------------------------------- 6: duplicated rows
def test_6_duplicated_csv_rows(s4, ms3, avss, tmp_path):
    """A row repeated in the S4, MS3, AVSS or VPO CSV: named with both rows, not trained twice."""
    for (root, base), name, clip in ((s4, "s4_meta_data.csv", "a"), (ms3, "ms3_meta_data.csv", "m2"),
                                     (avss, "metadata.csv", "s1")):
        csv_path = base / name
        rewrite_csv(csv_path, lambda lines: lines + [next(x for x in lines if x.startswith(clip + ","))])
        task = {"s4_meta_data.csv": "s4", "ms3_meta_data.csv": "ms3", "metadata.csv": "avss"}[name]
        with raises_naming(csv_path, f": clip {clip} is listed twice") as e:
            data.AVSBenchFrames(root, task, "train")
        one_line(e)
    vpo = tmp_path / "vpo"
    csv_path = pathlib.Path(vpo_ss(vpo)) / "vpo_ss_data_stereo.csv"
    rewrite_csv(csv_path, lambda lines: lines + [lines[2]])
    with raises_naming(csv_path, r": rows 2 and 4 under the header are the same \(img_Id 2"):
        data.VPODataset(vpo, "ss", "train")


# ----------------------------------------------------------------------------- 7: S4 CSV without category
def test_7_s4_csv_without_category_column(s4):
    root, base = s4
    csv_path = base / "s4_meta_data.csv"
    rewrite_csv(csv_path, lambda lines: [",".join(x.split(",")[:2] + x.split(",")[3:]) for x in lines])
    for make in (data.AVSBenchFrames, data.AVSBenchDataset):
        with raises_naming(csv_path, ": missing column.s. category") as e:
            make(root, "s4", "train")
        one_line(e)


# ----------------------------------------------------------------------------- 8: label2idx.json
def test_8_label2idx_differs_from_the_built_in_classes(avss):
    root, base = avss
    path = base / "label2idx.json"
    path.write_text(json.dumps({name: j + 1 for j, name in enumerate(data.AVSS_CLASSES)}))
    assert len(data.AVSBenchFrames(root, "avss", "train")) > 0  # the released file
    names = list(data.AVSS_CLASSES)
    names[15], names[16] = names[16], names[15]
    path.write_text(json.dumps({name: j + 1 for j, name in enumerate(names)}))
    with raises_naming(path, ": class 16 of 71 is 'clock' where the 71 AVSBench-Semantics classes have "
                             "'clipper'") as e:
        data.AVSBenchFrames(root, "avss", "train")
    one_line(e)
    path.write_text(json.dumps({name: j + 1 for j, name in enumerate(data.AVSS_CLASSES + ["kazoo"])}))
    with raises_naming(path, ": class 72 of 72 is 'kazoo'"):
        data.AVSBenchDataset(root, "avss", "test")


# ----------------------------------------------------------------------------- 9: AVSS test colour
@pytest.mark.parametrize("script", [cavp, tpavi])
def test_9_avss_test_colour_fails_before_training(avss, tmp_path, script):
    """A colour outside the palette in a test mask: the run stops before training, no checkpoint written."""
    root, base = avss
    mask = base / "v1m/mt/labels_rgb/4.png"
    Image.fromarray(np.full((12, 18, 3), 7, np.uint8)).save(mask)
    out = tmp_path / "run"
    with raises_naming(mask, r": colour \(7, 7, 7\) is not in the AVSS 71-class palette") as e:
        script.main(script.parse_args(["--data", "avss", "--data-root", str(root), "--out", str(out),
                                       *SCRIPT_ARGS]))
    one_line(e)
    assert not (out / "last.pt").exists()


# ----------------------------------------------------------------------------- 10: --out of another run
@pytest.mark.parametrize("script", [cavp, tpavi])
def test_10_out_holding_another_run(s4, tmp_path, script):
    """A new run into a folder with another run's checkpoint stops before training and leaves it as it was;
    --overwrite replaces it on purpose, --resume / --eval-only use the folder as meant."""
    root, _ = s4
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"another run")
    argv = ["--data", "avsbench_s4", "--data-root", str(root), "--out", str(out), *SCRIPT_ARGS]
    with pytest.raises(data.DataError, match=re.escape(f"--out {out} holds another run (last.pt); ") +
                       ".*--overwrite") as e:
        script.main(script.parse_args(argv))
    one_line(e)
    assert (out / "last.pt").read_bytes() == b"another run" and not (out / "log.txt").exists()
    assert script.run_folder(script.parse_args(argv + ["--overwrite"]), 1) == str(out)
    assert script.run_folder(script.parse_args(argv + ["--eval-only", "--ckpt", str(out / "last.pt")]),
                             1) == str(out)
