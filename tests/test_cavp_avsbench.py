"""cavp.py on AVSBench (CAVP Tables 1-3, 5): the frame view of data.py and short runs of the three modes on
fixtures in the released layouts (train, val selection, test of best.pt, resume, --eval-only, predict, errors)."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cavp
import data
import fixtures_layouts as fl

SR = data.SAMPLE_RATE
S4 = [("a", "dog_barking", "train"), ("b", "race_car", "train"), ("c", "dog_barking", "train"),
      ("d", "race_car", "train"), ("v", "race_car", "val"), ("t", "dog_barking", "test")]
MS3 = [("m1", "train"), ("m2", "train"), ("mv", "val"), ("mt", "test")]
AVSS = [("s1", "v1s", "train", 3), ("m1", "v1m", "train", 15), ("w1", "v2", "train", 70), ("sv", "v1s", "val", 3),
        ("mv", "v1m", "val", 1), ("st", "v1s", "test", 1), ("mt", "v1m", "test", 15)]


def stepped_wav(path, seconds=5, rate=8000):
    """Second s holds the constant (0.1 (s + 1), -0.05 (s + 1)) (left, right): tells frames and sides apart."""
    level = np.repeat(0.1 * np.arange(1, seconds + 1), rate)
    data.write_wav(path, np.stack([level, -0.5 * level]), rate)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("avsbench"))
    fl.write_s4(d, S4, h=24, w=36)
    fl.write_ms3(d, MS3, h=24, w=36)
    fl.write_avss(d, AVSS, h=32, w=48)
    stepped_wav(os.path.join(d, "Single-source", "s4_data", "audio_wav", "test", "dog_barking", "t.wav"))
    # MS3 test frame 3 shows no sounding object
    Image.fromarray(np.zeros((24, 36), np.uint8)).save(
        os.path.join(d, "Multi-sources", "ms3_data", "gt_masks", "test", "mt", "mt_3.png"))
    return d


# ----------------------------------------------------------------------------- frames (data.AVSBenchFrames)


def test_frames_one_per_labelled_frame_with_its_second(root):
    train = data.AVSBenchFrames(root, "s4", "train", size=None, labels="category")
    assert len(train) == 4 and [train[i]["name"] for i in range(4)] == ["a_1", "b_1", "c_1", "d_1"]  # semi-supervised
    test = data.AVSBenchFrames(root, "s4", "test", size=None, stereo=True)
    assert len(test) == 5 and test.classes == ["background", "sounding object"]
    left, right = data.read_wav(os.path.join(root, "Single-source", "s4_data", "audio_wav", "test", "dog_barking",
                                             "t.wav"))[0]
    for j in range(5):
        s = test[j]
        assert s["name"] == f"t_{j + 1}" and s["wave"].shape == (2, 3 * SR)
        # frame j + 1 hears second j of the clip (8 kHz in the file), three times over (1 s repeat-padded to 3 s)
        sec = slice(j * 8000 + 100, (j + 1) * 8000 - 100)
        for ch, ref in ((0, left), (1, right)):
            assert s["wave"][ch].mean().item() == pytest.approx(ref[sec].mean(), abs=2e-3)
            for rep in range(3):
                part = s["wave"][ch, rep * SR + 300:(rep + 1) * SR - 300]
                assert part.min().item() == pytest.approx(ref[sec].min(), abs=2e-3)
                assert part.max().item() == pytest.approx(ref[sec].max(), abs=2e-3)
        assert s["audio_classes"].tolist() == [0, 1] and s["audio_pos"] == 0.5 and s["source_pos"].tolist() == [-1, .5]


def test_s4_categories_are_the_audio_classes(root):
    ds = data.AVSBenchFrames(root, "s4", "train", size=None, labels="category")
    assert ds.classes == ["background"] + data.AVS_S4_CATEGORIES and len(ds.classes) == 24
    for i, (name, category, _) in enumerate(S4[:4]):
        s = ds[i]
        k = 1 + data.AVS_S4_CATEGORIES.index(category)
        fg = np.zeros((24, 36), bool)
        fg[:, :12] = True  # the fixture's foreground: the left third
        assert (s["mask"].numpy() == np.where(fg, k, 0)).all()
        assert torch.nonzero(s["audio_classes"]).flatten().tolist() == [k] and s["audio_pos"] == 0.5
        assert s["source_pos"][k] == 0.5 and (s["source_pos"] < 0).sum() == 23


def test_ms3_avss_classes_come_from_the_mask(root):
    ms3 = data.AVSBenchFrames(root, "ms3", "test", size=16)
    assert len(ms3) == 5 and ms3[0]["audio_classes"].tolist() == [0, 1]
    empty = ms3[2]  # mt_3: nothing sounds in the frame
    assert empty["name"] == "mt_3" and (empty["mask"] == 0).all()
    assert empty["audio_classes"].tolist() == [0, 0] and empty["audio_pos"] == -1
    avss = data.AVSBenchFrames(root, "avss", "train", size=None)
    assert len(avss) == 1 + 5 + 10 and avss.classes == data.AVSS_CLASSES  # v1s train: frame 0 only
    s = avss[1]
    assert s["name"] == "m1_0" and s["image"].shape == (3, 32, 48) and torch.nonzero(s["audio_classes"]).item() == 15
    assert data.AVSS_CLASSES[15] == "clipper" and data.AVSS_CLASSES[70] == "woman"  # label2idx.json - 1
    for part, names in (("v1s", ["st_0", "st_1"]), ("v1m", ["mt_0", "mt_1"])):
        ds = data.AVSBenchFrames(root, "avss", "test", size=None, part=part)
        assert len(ds) == 5 and [ds[i]["name"] for i in range(2)] == names


def test_train_flip_swaps_stereo_with_the_image(root):
    ds = data.AVSBenchFrames(root, "s4", "test", size=None, stereo=True, train=True, crop=80)
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        s = ds[0]
        fg = (s["mask"] > 0) & (s["mask"] != 255)
        cols = torch.nonzero(fg.any(0)).flatten().float()
        valid = torch.nonzero((s["mask"] != 255).any(0)).flatten().float()
        flipped = cols.mean() > valid.mean()  # the left-third object now on the right
        left_louder = s["wave"][0].mean() > 0  # the file's left channel is the positive one
        assert bool(left_louder) != bool(flipped)
        seen.add(bool(flipped))
    assert seen == {True, False}


# ----------------------------------------------------------------------------- runs


def common(root, out, *extra):
    return ["--data-root", root, "--out", str(out), "--backbone", "resnet18", "--pretrained", "none",
            "--output-stride", "16", "--batch-size", "2", "--workers", "0", "--log-every", "1",
            "--anchors-per-group", "32", "--bank-size", "1", "--overlays", "2", *extra]


def main(*argv):
    return cavp.main(cavp.parse_args([str(a) for a in argv]))


def load(path):
    with open(path) as f:
        return json.load(f)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


MODES = {"avsbench_s4": ["--resize", "32"], "avsbench_ms3": ["--resize", "32", "--limit", "6"],
         "avss": ["--crop", "32", "--limit", "6"]}


@pytest.mark.parametrize("dataset", list(MODES))
def test_train_val_test_eval_predict(root, tmp_path, capsys, dataset):
    out = tmp_path / "run"
    argv = ["--data", dataset, *common(root, out, *MODES[dataset], "--epochs", "1", "--max-iters", "2")]
    res = main(*argv)
    m = load(out / "metrics.json")
    assert [h["split"] for h in m["history"]] == ["val"] and m["history"][0]["weights"] == "last"
    assert m["final"]["split"] == "test" and m["final"]["weights"] == "best" and res["split"] == "test"
    assert m["best"]["metric"] == ("miou" if dataset == "avss" else "mj")
    ckpt = torch.load(out / "last.pt", weights_only=True)
    args = ckpt["args"]
    binary = dataset != "avss"
    assert args["mono"] and args["resize"] == (32 if binary else 0)
    assert args["s4_labels"] == ("category" if dataset == "avsbench_s4" else None)
    k = {"avsbench_s4": 24, "avsbench_ms3": 2, "avss": 71}[dataset]
    assert ckpt["model"]["classifier.6.weight"].shape[0] == k
    assert len(m["final"]["iou"]) == (2 if binary else 71)
    if binary:  # Tables 1-2: binary mIoU / F-beta and the AVSBench M_J / M_F
        assert all(math.isfinite(m["final"][key]) for key in ("mj", "mf", "miou", "mean_fbeta"))
    else:
        assert m["final"]["part"] == "all" and math.isfinite(m["final"]["miou"])
    stdout = capsys.readouterr().out
    part = ", part all" if dataset == "avss" else ""
    assert f"eval val{part} (last weights)" in stdout and f"eval test{part} (best weights)" in stdout
    assert ("M_J " in stdout) == binary
    assert len(list((out / "overlays").glob("*.png"))) == 2
    # --eval-only of best.pt gives the run's final test figures, at the frame size of the checkpoint (S4 / MS3:
    # 32, not the default 224)
    ev = tmp_path / "eval"
    main("--data", dataset, *common(root, ev, *MODES[dataset][2:]), "--eval-only", "--ckpt", out / "best.pt")
    assert load(ev / "eval-real.json")["eval"]["miou"] == pytest.approx(m["final"]["miou"])
    if dataset == "avss":  # Table 3's columns: the v1s and v1m parts of the test split
        for part, own, other in (("v1s", 1, 15), ("v1m", 15, 1)):
            res = main("--data", "avss", *common(root, ev, "--limit", "6", "--avss-part", part), "--eval-only",
                       "--ckpt", out / "best.pt")
            saved = load(ev / f"eval-real-{part}.json")["eval"]
            assert saved["part"] == part and saved["miou"] == pytest.approx(res["miou"])
            # the part's frames only: its own class is in the ground truth, the other part's class at most predicted
            assert saved["present"][own] and saved["iou"][other] in (None, 0)
    # predict with the run's classes
    frame = data.AVSBenchFrames(root, {"avsbench_s4": "s4", "avsbench_ms3": "ms3", "avss": "avss"}[dataset], "test",
                                size=None).clips.samples[0]
    pred = cavp.main(cavp.parse_args(["--predict", frame["frames"][0], "--audio", frame["wav"], "--ckpt",
                                      str(out / "best.pt"), "--out", str(tmp_path / "pred")]))
    names = cavp.class_names(dataset, args["s4_labels"])
    assert set(pred["classes"]) <= set(names[1:]) and len(names) == k
    assert (tmp_path / "pred" / (os.path.splitext(os.path.basename(frame["frames"][0]))[0] + ".png")).is_file()


def test_resume_is_exact(root, tmp_path):
    """--workers 0, S4 with 2 iterations an epoch: 2 epochs straight == 1 epoch + --resume, bit for bit."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    argv = ["--data", "avsbench_s4", "--resize", "32", "--epochs", "2", "--eval-every", "1", "--overlays", "0"]
    main(*common(root, straight, *argv))
    main(*common(root, split, *argv, "--max-iters", "2"))
    main(*common(root, split, *argv, "--resume", split / "last.pt"))
    a, b = weights(straight / "last.pt"), weights(split / "last.pt")
    assert all(torch.equal(a[key], b[key]) for key in a)
    ma, mb = load(straight / "metrics.json"), load(split / "metrics.json")
    assert ma["final"] == mb["final"] and ma["history"] == mb["history"]


@pytest.mark.parametrize("argv,needle", [
    (["--data", "avss", "--match", "side"], "--match side compares VPO's source positions"),
    (["--data", "avsbench_ms3", "--s4-labels", "binary"], "--s4-labels is for --data avsbench_s4"),
    (["--data", "avsbench_s4", "--avss-part", "v1s"], "--avss-part is for --data avss"),
    (["--data", "vpo_ss", "--resize", "224"], "--resize is for AVSBench"),
    (["--data", "avss", "--eval-only", "--ckpt", "x.pt", "--eval-audio", "silence"], "on a VPO --data"),
])
def test_bad_flags(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        cavp.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_bad_data_one_line_errors(root, tmp_path):
    def error(*argv):
        with pytest.raises(data.DataError) as e:
            main(*argv)
        assert "\n" not in str(e.value)
        return str(e.value)
    base = ["--backbone", "resnet18", "--pretrained", "none", "--workers", "0", "--out", tmp_path / "o"]
    assert "AVSBench" in error("--data", "avsbench_ms3", "--data-root", tmp_path / "none", *base)
    # an S4 category outside the 23, with category labels (binary labels read it)
    bad = tmp_path / "bad"
    fl.write_s4(str(bad), [("x", "dog", "train"), ("y", "dog", "val"), ("z", "dog", "test")])
    msg = error("--data", "avsbench_s4", "--data-root", bad, *base)
    assert "s4_meta_data.csv: category 'dog' of clip " in msg and "binary" in msg
    # no frame of the asked part
    only = tmp_path / "only"
    fl.write_avss(str(only), [("s1", "v1s", "train", 3), ("s2", "v1s", "val", 3), ("s3", "v1s", "test", 3)])
    assert "no labelled frame of part v1m" in error("--data", "avss", "--data-root", only, "--avss-part", "v1m",
                                                    *base)
    # a checkpoint of another class set
    run = tmp_path / "s4run"
    main("--data", "avsbench_s4", *common(root, run, "--resize", "32", "--epochs", "1", "--max-iters", "1",
                                          "--overlays", "0"))
    msg = error("--data", "avss", "--data-root", root, "--eval-only", "--ckpt", run / "best.pt", *base)
    assert "trained on --data avsbench_s4, whose classes differ from --data avss" in msg
