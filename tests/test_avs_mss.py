"""AVS-M-SS (CAVP Sec. 5.2): `vpo_make.py --avs-mss` on AVSBench S4 and VGGSound fixtures (a partial VGGSound
included), the t-test of benchmarks/summarize.py against closed forms, and `benchmarks/reproduce.sh avsmss` end to
end on the fixtures."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import data
import fixtures_layouts as fl
import vpo_make
from script_runner import ENV, ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import summarize  # noqa: E402

S4 = [("a", "dog_barking", "train"), ("b", "race_car", "train"), ("c", "baby_laughter", "train"),
      ("d", "dog_barking", "train"), ("v", "race_car", "val"), ("w", "dog_barking", "val"),
      ("t", "dog_barking", "test"), ("u", "race_car", "test")]
# VGGSound fixture: (youtube id, label, split, on disk); race car has train clips only, baby laughter's only clip
# is missing, 'people marching' is no S4 label
VGG = [("dog1", "dog barking", "train", True), ("dog2", "dog barking", "train", True),
       ("dog3", "dog barking", "test", True), ("car1", "race car, auto racing", "train", True),
       ("car2", "race car, auto racing", "train", True), ("baby", "baby laughter", "train", False),
       ("march", "people marching", "train", True)]


def write_vggsound(root):
    """vggsound.csv and 10 s clips, each a constant level of its own (tells clips apart after linking)."""
    os.makedirs(os.path.join(root, "audio"))
    for i, (ytid, label, split, on_disk) in enumerate(VGG):
        if on_disk:
            data.write_wav(os.path.join(root, "audio", f"{ytid}_000030.wav"), np.full(10 * 8000, 0.05 * (i + 1)), 8000)
    with open(os.path.join(root, "vggsound.csv"), "w", newline="") as f:
        csv.writer(f).writerows([(ytid, 30, label, split) for ytid, label, split, _ in VGG])
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    return fl.write_s4(str(d / "avs"), S4), write_vggsound(str(d / "vgg"))


def build(sources, out, seed=0):
    return vpo_make.main(["--avs-mss", "--avsbench", sources[0], "--vggsound", sources[1], "--out", str(out),
                          "--seed", str(seed), "--workers", "1"])


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_build_replaces_audio_by_category_and_split(sources, tmp_path, capsys):
    out = tmp_path / "mss"
    assert build(sources, out) == 0
    printed, err = capsys.readouterr()
    src = os.path.join(sources[0], "Single-source")
    dst = out / "Single-source"
    rows = {r["name"]: r for r in read_rows(out / "avs_mss_audio.csv")}
    assert sorted(rows) == sorted(n for n, _, _ in S4)
    split_of = {ytid: split for ytid, _, split, _ in VGG}
    label_of = {ytid: label for ytid, label, _, _ in VGG}
    for name, cat, split in S4:
        rel = os.path.join("s4_data", "audio_wav", split, cat, f"{name}.wav")
        vgg = rows[name]["vgg_file"]
        if cat == "baby_laughter":  # no usable clip: the AVSBench audio stays
            assert vgg == "" and os.path.samefile(dst / rel, os.path.join(src, rel))
            continue
        ytid = vgg.split("_")[0]
        assert label_of[ytid] == vpo_make.S4_VGGSOUND[cat]
        # the matching VGGSound split; race car has no test clip, so its val / test clips come from train
        want = "train" if split == "train" or cat == "race_car" else "test"
        assert split_of[ytid] == want
        assert os.path.samefile(dst / rel, os.path.join(sources[1], "audio", vgg + ".wav"))
    for name, cat, split in S4:  # frames and masks unchanged (hard links), the CSV copied
        for sub in ("visual_frames", "gt_masks"):
            folder = os.path.join("s4_data", sub, split, cat, name)
            files = sorted(os.listdir(os.path.join(src, folder)))
            assert sorted(os.listdir(dst / folder)) == files
            assert all(os.path.samefile(dst / folder / f, os.path.join(src, folder, f)) for f in files)
    with open(dst / "s4_meta_data.csv", "rb") as f, open(os.path.join(src, "s4_meta_data.csv"), "rb") as g:
        assert f.read() == g.read()
    summary = json.loads((out / "avs_mss_summary.json").read_text())
    assert summary["splits"] == {"train": dict(clips=4, replaced=3, kept=1), "val": dict(clips=2, replaced=2, kept=0),
                                 "test": dict(clips=2, replaced=2, kept=0)}
    assert summary["missing"]["categories"] == {"baby_laughter": 1} and "baby laughter" in summary["missing"]["labels"]
    assert summary["vggsound"]["clips_listed"] == 6 and summary["vggsound"]["clips_missing"] == 1
    assert summary["categories"]["race_car"] == dict(label="race car, auto racing", replaced=3, kept=0)
    # partial VGGSound: one warning line per gap, the summary printed
    assert "warning: 1 of 6 S4-category clips listed" in err
    assert "warning: S4 category baby_laughter (VGGSound label 'baby laughter') has no usable VGGSound clip; its 1 " \
           "clips keep their AVSBench audio" in err
    assert "train        4         3     1" in printed and "baby_laughter in 1 clips" in printed
    # the readers see VGGSound audio: 1 s per frame from the clip start
    clip = data.AVSBenchDataset(out, "s4", "test", size=16)[0]
    level = 0.05 * (1 + [v[0] for v in VGG].index(rows["t"]["vgg_file"].split("_")[0]))
    assert clip["name"] == "t" and abs(clip["wave"][0, 1000:-1000].mean().item() - level) < 1e-3


def test_build_is_seeded_and_reruns_in_place(sources, tmp_path):
    assert build(sources, tmp_path / "a") == 0 and build(sources, tmp_path / "b") == 0
    first = (tmp_path / "a" / "avs_mss_audio.csv").read_bytes()
    assert (tmp_path / "b" / "avs_mss_audio.csv").read_bytes() == first
    assert build(sources, tmp_path / "a") == 0 and (tmp_path / "a" / "avs_mss_audio.csv").read_bytes() == first
    picks = {read_rows(tmp_path / "a" / "avs_mss_audio.csv")[0]["vgg_file"]}
    for seed in range(1, 6):  # dog_barking train clip a draws among two clips
        assert build(sources, tmp_path / f"s{seed}", seed) == 0
        picks.add(read_rows(tmp_path / f"s{seed}" / "avs_mss_audio.csv")[0]["vgg_file"])
    assert picks == {"dog1_000030", "dog2_000030"}


def test_cli_errors(sources, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        vpo_make.parse_args(["--avs-mss", "--avsbench", sources[0], "--out", str(tmp_path)])
    assert e.value.code == 2 and "--avs-mss needs --avsbench AVSBENCH_ROOT and --vggsound" in capsys.readouterr().err
    empty = tmp_path / "vgg"
    (empty / "audio").mkdir(parents=True)
    (empty / "vggsound.csv").write_text("x1,3,dog barking,train\n")
    assert build((sources[0], str(empty)), tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no usable clip of the 1 S4-category clips" in err
    assert build((str(tmp_path / "none"), sources[1]), tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none: no s4_meta_data.csv in it or in its Single-source/; pass --avsbench" in err


# ----------------------------------------------------------------------------- t-test of summarize.py


@pytest.mark.parametrize("t", [0.05, 0.7, 2.0, 6.0])
def test_t_distribution_against_closed_forms(t):
    # two-sided p = I_{df/(df+t^2)}(df/2, 1/2); closed forms for df = 1 (Cauchy), 2 and 4
    p = {1: 1 - 2 / math.pi * math.atan(t), 2: 1 - t / math.sqrt(2 + t * t)}
    u = t / math.sqrt(4 + t * t)
    p[4] = 1 - u * (3 - u * u) / 2  # df = 4: P(|T| < t) = u (3 - u^2) / 2, u = t / sqrt(4 + t^2)
    for df, ref in p.items():
        assert summarize.betainc(df / 2, 0.5, df / (df + t * t)) == pytest.approx(ref, rel=1e-12, abs=1e-14)


def test_t_tests_and_table_critical_values():
    # 5 % two-sided critical values of Student's t (tables): df 4 -> 2.776445, df 10 -> 2.228139
    for df, crit in ((4, 2.776445), (10, 2.228139)):
        assert summarize.betainc(df / 2, 0.5, df / (df + crit ** 2)) == pytest.approx(0.05, abs=2e-7)
    x, y = [1.0, 2.0, 4.0], [2.0, 3.0, 3.5, 5.5]
    t, df, p = summarize.t_test(x, y)
    mx, my, vx, vy = 7 / 3, 3.5, np.var(x, ddof=1), np.var(y, ddof=1)
    assert df == 5 and t == pytest.approx((mx - my) / math.sqrt((2 * vx + 3 * vy) / 5 * (1 / 3 + 1 / 4)))
    tw, dfw, pw = summarize.t_test(x, y, welch=True)
    se2 = vx / 3 + vy / 4
    assert tw == pytest.approx((mx - my) / math.sqrt(se2))
    assert dfw == pytest.approx(se2 ** 2 / ((vx / 3) ** 2 / 2 + (vy / 4) ** 2 / 3))
    assert 0 < p < 1 and 0 < pw < 1 and p != pw
    # no spread (e.g. identical runs): a difference is certain, no difference undefined
    assert summarize.t_test([1.0, 1.0], [2.0, 2.0])[2] == 0 and math.isnan(summarize.t_test([1.0, 1.0], [1.0, 1.0])[2])
    # the paper's F_beta, 83.36 +- 1.2 vs 83.70 +- 1.0 (3 runs each): p = 0.73 with either test
    a, b = [82.16, 83.36, 84.56], [82.70, 83.70, 84.70]
    assert round(summarize.t_test(a, b)[2], 2) == round(summarize.t_test(a, b, welch=True)[2], 2) == 0.73


def test_summarize_avsmss_tables(tmp_path, capsys):
    for subset, mj in (("s4", [0.70, 0.72, 0.74]), ("avsmss", [0.73, 0.74, 0.75])):
        for seed, v in enumerate(mj):
            d = tmp_path / f"tpavi-{subset}-s{seed}"
            d.mkdir()
            (d / "metrics.json").write_text(json.dumps(dict(final=dict(miou=0.5, mj=v, mf=v + 0.1))))
            (d / "log.txt").write_text("done in 60 s; best mj 0.7\n")
    summarize.main(["--avsmss", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| AVSBench S4 | 0,1,2 | 3 | 72.00 +- 2.00 | 82.00 +- 2.00 |" in out
    assert "| AVS-M-SS | 0,1,2 | 3 | 74.00 +- 1.00 | 84.00 +- 1.00 |" in out
    # Student: t = -2 / sqrt(2.5 (2 / 3)), df 4 (closed form above); Welch: df = (5/3)^2 / ((4/3)^2 / 2 + (1/3)^2 / 2)
    t = -2 / math.sqrt(2.5 * 2 / 3)
    u = -t / math.sqrt(4 + t * t)
    p = 1 - u * (3 - u * u) / 2
    welch_df = (5 / 3) ** 2 / ((4 / 3) ** 2 / 2 + (1 / 3) ** 2 / 2)
    for key in ("M_J", "M_F"):
        assert f"- {key}: Student (pooled variance) t = {t:.3f}, df = 4.00, p = {p:.3f}; Welch t = {t:.3f}, " \
               f"df = {welch_df:.2f}, p = " in out


# ----------------------------------------------------------------------------- benchmarks/reproduce.sh avsmss


def test_reproduce_avsmss_end_to_end(sources, tmp_path):
    out = tmp_path / "runs"
    env = dict(ENV, AVSBENCH=sources[0], VGGSOUND=sources[1], OUT_AVSMSS=str(out), SEEDS_AVSMSS="0 1",
               EPOCHS_AVSMSS="1", JOBS="2", PYTHON=sys.executable,
               AVSMSS_ARGS="--backbone resnet18 --pretrained none --crop 32 --batch-size 4 --workers 0 --overlays 0")
    cmd = ["bash", os.path.join(ROOT, "benchmarks", "reproduce.sh"), "avsmss"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "AVS-M-SS build (seed 0)" in proc.stdout
    for name in ("tpavi-s4-s0", "tpavi-s4-s1", "tpavi-avsmss-s0", "tpavi-avsmss-s1"):
        m = json.loads((out / name / "metrics.json").read_text())
        assert m["final"]["split"] == "test" and m["final"]["weights"] == "best"
    assert json.loads((out / "tpavi-avsmss-s0" / "metrics.json").read_text())["args"]["data_root"] == \
        str(out / "avs-mss")
    assert "| AVSBench S4 | 0,1 | 2 |" in proc.stdout and "| AVS-M-SS | 0,1 | 2 |" in proc.stdout
    assert "- M_J: Student (pooled variance) t = " in proc.stdout and "- M_F: " in proc.stdout
    # finished runs and the built data are not redone
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "tpavi-s4-s0" not in again.stdout and "AVS-M-SS build" not in again.stdout
    assert "- M_J: Student" in again.stdout
