"""benchmarks/summarize.py on hand-written run folders in the layout reproduce.sh leaves behind."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import summarize  # noqa: E402


def fake_run(root, name, miou, fbeta=0.5, fdr=0.25, secs=120, done=True, evals=None):
    d = root / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(dict(final=dict(miou=miou, mean_fbeta=fbeta, mean_fdr=fdr))))
    (d / "log.txt").write_text("ep 1/1 ...\n" + (f"done in {secs} s; best mIoU {100 * miou:.2f}\n" if done else ""))
    for audio, (pred, true) in (evals or {}).items():
        res = dict(miou=miou, fg_pred=pred, fg_true=true)
        (d / f"eval-{audio}.json").write_text(json.dumps(dict(eval=res)))


def test_tables_means_margins_and_unfinished_runs(tmp_path, capsys):
    fake_run(tmp_path, "cavp-ss-s0", 0.20, secs=180, evals=dict(real=(0.04, 0.05), silence=(0.0, 0.0),
                                                                 absent=(0.01, 0.0)))
    fake_run(tmp_path, "cavp-ss-s1", 0.30, secs=240, evals=dict(real=(0.02, 0.05), silence=(0.01, 0.0),
                                                                 absent=(0.01, 0.0)))
    fake_run(tmp_path, "tpavi-ss-s0", 0.05)
    fake_run(tmp_path, "tpavi-ss-s1", 0.07)
    fake_run(tmp_path, "cavp-mono-ss-s0", 0.40)
    fake_run(tmp_path, "cavp-ms-s0", 0.90, done=False)  # interrupted: not counted
    summarize.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| VPO-SS | CAVP (stereo) | 0,1 | 25.00 (20.00-30.00) | 50.00 (50.00-50.00) | 25.00 (25.00-25.00) " \
           "| 3.5 (3.0-4.0) |" in out
    assert "VPO-MS |" not in out
    assert "mIoU: SS +19.00" in out  # (20 + 30) / 2 - (5 + 7) / 2
    assert "stereo - mono, mIoU: SS -20.00" in out  # seed 0 only: 20 - 40
    # audio alignment: ground truth 5 %, real 3 % (4, 2), silence 0.5 % = 0 and 50 % of real, absent 25 / 50 %
    assert "| VPO-SS | CAVP (stereo) | 2 | 5.00 | 3.00 (2.00-4.00) | 0.50 (0.00-1.00) | 25 (0-50) " \
           "| 1.00 (1.00-1.00) | 38 (25-50) |" in out


def test_eval_disagreeing_with_training_stops(tmp_path):
    fake_run(tmp_path, "cavp-ss-s0", 0.20, evals=dict(real=(0.04, 0.05)))
    (tmp_path / "cavp-ss-s0" / "eval-real.json").write_text(json.dumps(dict(eval=dict(miou=0.1))))
    with pytest.raises(SystemExit, match="disagrees"):
        summarize.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="not found"):
        summarize.main([str(tmp_path / "missing")])


def test_readings_tables_pair_seeds_and_show_twin_metrics(tmp_path, capsys):
    fake_run(tmp_path, "cavp-msmi-s0", 0.20)
    fake_run(tmp_path, "cavp-msmi-s1", 0.30)
    fake_run(tmp_path, "poslabel-msmi-s0", 0.25)
    fake_run(tmp_path, "poslabel-msmi-s1", 0.31)
    fake_run(tmp_path, "poslabel-msmi-s2", 0.90)  # no cavp seed 2: in the mean, not in the paired difference
    twins = dict(twin_recall=0.5, twin_share=0.25, twin_side_acc=0.75, twin_recall_swap=0.125,
                 twin_share_swap=0.5, twin_side_acc_swap=0.0)
    for name, miou in (("best-msmi-s0", 0.4), ("best-mono-msmi-s0", 0.3)):
        fake_run(tmp_path, name, miou)
        res = json.loads((tmp_path / name / "metrics.json").read_text())
        res["final"].update(twins)
        (tmp_path / name / "metrics.json").write_text(json.dumps(res))
    summarize.main(["--readings", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| VPO-MSMI | --positives label | 0,1,2 | 48.67 (25.00-90.00) | 3.00 (1.00-5.00) |" in out
    assert "| VPO-MSMI | best combination | 0 | 40.00 | 10.00 | 50.00 | 25.00 | 50.0 | 25.0 | 75.0 | 12.5 | 50.0 " \
           "| 0.0 |" in out
    assert "| VPO-SS |" not in out
    assert "paired by seed, mIoU: best - poslabel 15.00" in out  # seed 0 only: 40 - 25


def probe_run(root, name, history, done=True):
    """A stereo_probe.sh run folder: metrics.json with the evaluations (iteration, side acc real / swapped)."""
    hist = [dict(iteration=it, miou=0.5, twin_recall=0.6, twin_share=0.2, twin_side_acc=real,
                 twin_side_acc_swap=swap) for it, real, swap in history]
    d = root / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(dict(history=hist, final=hist[-1])))
    (d / "log.txt").write_text("ep 1/1 ...\n" + ("done in 60 s; best mIoU 50.00\n" if done else ""))


def test_stereo_probe_curves_and_final_table(tmp_path, capsys):
    probe_run(tmp_path, "base-solo-s0", [(64, 0.40, 0.38), (128, 0.50, 0.50)])
    probe_run(tmp_path, "pos-solo-s0", [(64, 0.50, 0.30), (128, 0.80, 0.10)])
    probe_run(tmp_path, "pos-solo-s1", [(64, 0.70, 0.50), (128, 0.90, 0.20)])
    probe_run(tmp_path, "all-long-solo-s0", [(64, 0.60, None)], done=False)  # still training
    probe_run(tmp_path, "all-mixed-s0", [(128, 0.55, 0.45)])
    probe_run(tmp_path, "cavp-msmi-s0", [(64, 0.99, 0.0)])  # not a probe run: ignored
    summarize.main(["--stereo-probe", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| iteration | base (solo) s0 | pos (solo) s0 | pos (solo) s1 | all-long (solo) s0, running " \
           "| all (mixed) s0 |" in out
    assert "| 64 | 40.0 / 38.0 | 50.0 / 30.0 | 70.0 / 50.0 | 60.0 / - | - |" in out  # a column per seed
    assert "| 128 | 50.0 / 50.0 | 80.0 / 10.0 | 90.0 / 20.0 | - | 55.0 / 45.0 |" in out
    assert "| one sounding twin | pos | base + --pos-enc sine | 0,1 | 128 | 50.00 (50.00-50.00) | 60.0 (60.0-60.0) " \
           "| 20.0 (20.0-20.0) | 85.0 (80.0-90.0) | 15.0 (10.0-20.0) | 70.0 (70.0-70.0) |" in out
    assert "| twin + other sources | all | all four levers | 0 | 128 | 50.00 | 60.0 | 20.0 | 55.0 | 45.0 " \
           "| 10.0 |" in out
    assert "all-long |" not in out and "cavp" not in out  # unfinished: curve only; foreign folder: nowhere
    with pytest.raises(SystemExit, match="no run folder"):
        summarize.main(["--stereo-probe", str(tmp_path / "cavp-msmi-s0")])


def test_paired_p_against_t_table():
    # d = 1, 2, 3: t = 2 / (1 / sqrt 3) = 3.4641, df 2; two-sided p = 1 - t / sqrt(t^2 + 2) for df 2
    t = 2 * 3 ** 0.5
    assert summarize.paired_p([1.0, 2.0, 3.0]) == pytest.approx(1 - t / (t * t + 2) ** 0.5, rel=1e-9)
    assert summarize.paired_p([-1.0, -2.0, -3.0]) == pytest.approx(summarize.paired_p([1.0, 2.0, 3.0]))
    assert summarize.paired_p([2.0, 2.0]) == 0.0 and summarize.paired_p([1.0]) != summarize.paired_p([1.0])


def test_stereo_tables_pair_seeds_and_side_gap(tmp_path, capsys):
    for seed, (st, mo, sc, real, swap) in enumerate(((0.40, 0.30, 0.35, 0.9, 0.1), (0.50, 0.45, 0.52, 0.8, 0.3))):
        for name, miou in (("stereo", st), ("mono", mo), ("supcon", sc)):
            fake_run(tmp_path, f"{name}-msmi-s{seed}", miou)
            res = json.loads((tmp_path / f"{name}-msmi-s{seed}" / "metrics.json").read_text())
            res["final"].update(twin_recall=0.5, twin_share=0.25, twin_side_acc=real, twin_side_acc_swap=swap)
            (tmp_path / f"{name}-msmi-s{seed}" / "metrics.json").write_text(json.dumps(res))
    fake_run(tmp_path, "paper-msmi-s0", 0.2, done=False)  # interrupted: left out
    fake_run(tmp_path, "paper-msmi-s1", 0.3)
    fake_run(tmp_path, "paper-mono-msmi-s1", 0.1)
    probe_run(tmp_path, "curve-msmi-s0", [(256, 0.40, 0.38), (512, 0.9, 0.125)])
    summarize.main(["--stereo", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| 512 | 50.00 | 60.0 | 20.0 | 90.0 | 12.5 |" in out
    assert "| VPO-MSMI | CAVP, stereo (--pos-enc sine --pan crop) | 0,1 | 45.00 (40.00-50.00) " \
           "| 7.50 (5.00-10.00) |" in out
    assert "- miou, stereo - mono: 7.50 (5.00-10.00) [p = 0.205, 2 seeds]" in out  # t = 3, df 1
    assert "- miou, stereo - supcon: 1.50 (-2.00-5.00)" in out
    assert "- side acc, real - L/R swapped channels, stereo: 65.0 (50.0-80.0)" in out
    assert "| VPO-MSMI | CAVP, stereo, paper's setting (--pos-enc none --pan csv: the defaults) | 1 | 30.00 |" in out
    assert "- miou, paper - paper-mono: 20.00 [1 seed: no test]" in out
