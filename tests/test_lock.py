"""Behaviour lock: short recorded runs of cavp.py and tpavi.py that any restructuring must reproduce.

Each case trains on the tiny built-in VPO-MSMI (`--workers 0`, one thread, fp32, seed 0) and records the
loss parts logged at every iteration, the final test metrics and the final weights. The recording is
tests/lock/runs.json; `python tests/test_lock.py --record` writes it anew (only when a change of the
method is meant to change the numbers).

A rerun must give bit-identical weights; where a change only reorders floating-point sums, every logged
loss part must still agree to its last printed digit (1e-4, about 2e-5 relative), the metrics to 1e-6
and each weight tensor's sum and absolute sum to 1e-5 relative.
"""
import hashlib
import json
import os
import re
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import TINY_ARGS  # noqa: E402
from script_runner import ROOT, run_script  # noqa: E402

LOCK = os.path.join(ROOT, "tests", "lock", "runs.json")
COMMON = ["--data", "vpo_msmi", "--workers", "0", "--batch-size", "4", "--limit", "8", "--log-every", "1",
          "--seed", "0", "--no-amp", "--overlays", "0"]
# name -> (script, torchrun with 2 gloo ranks, flags): 24 iterations take the memory bank through its
# first fills and end with an evaluation; the 2-rank runs cover the global-batch exchanges.
CASES = {
    "cavp": ("cavp.py", False, ["--epochs", "12", "--max-iters", "24", "--eval-every", "12"]),
    "tpavi": ("tpavi.py", False, ["--epochs", "12", "--max-iters", "24", "--eval-every", "12"]),
    "cavp-2ranks": ("cavp.py", True, ["--epochs", "2", "--max-iters", "4", "--eval-every", "2"]),
    "tpavi-2ranks": ("tpavi.py", True, ["--epochs", "2", "--max-iters", "4", "--eval-every", "2"]),
}


def numbers(text):
    return [float(x) for x in re.findall(r"-?\d+\.\d+", text)]


def record_run(name, root, out):
    """What a case's run leaves behind, as plain JSON: logged loss parts per iteration, final metrics,
    the weights' digest and per-tensor sums."""
    script, torchrun, flags = CASES[name]
    run_script(script, *COMMON, "--data-root", root, "--out", out, *flags, torchrun=torchrun)
    with open(os.path.join(out, "log.txt")) as f:
        losses = dict(re.findall(r"^ep \d+/\d+ it (\d+)/\d+ (loss .*?) lr ", f.read(), re.M))
    with open(os.path.join(out, "metrics.json")) as f:
        final = json.load(f)["final"]
    model = torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]
    digest = hashlib.sha256()
    for key in sorted(model):
        digest.update(key.encode() + model[key].cpu().contiguous().numpy().tobytes())
    sums = {k: [model[k].double().sum().item(), model[k].double().abs().sum().item()] for k in sorted(model)}
    return dict(losses=losses, final=final, sha256=digest.hexdigest(), sums=sums)


def assert_close_tree(a, b, tol, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close_tree(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_tree(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        assert abs(a - b) <= tol, (where, a, b)
    else:
        assert a == b, (where, a, b)


@pytest.fixture(scope="module")
def recorded():
    with open(LOCK) as f:
        return json.load(f)


@pytest.mark.parametrize("name", list(CASES))
def test_run_reproduces_the_recording(name, recorded, tiny_vpo, tmp_path):
    want = recorded[name]
    got = record_run(name, tiny_vpo, str(tmp_path / name))
    assert sorted(got["losses"], key=int) == sorted(want["losses"], key=int)
    if got["sha256"] == want["sha256"]:  # bit-identical weights: every logged number must match exactly
        assert got["losses"] == want["losses"] and got["final"] == want["final"]
        return
    for it, line in want["losses"].items():  # reordered sums: each loss part to its last printed digit
        a, b = numbers(line), numbers(got["losses"][it])
        assert len(a) == len(b) and all(abs(x - y) <= 1e-4 + 1e-9 for x, y in zip(a, b)), (it, line, got)
    assert_close_tree(want["final"], got["final"], 1e-6, "final")
    assert want["sums"].keys() == got["sums"].keys()
    for k, (s, a) in want["sums"].items():
        gs, ga = got["sums"][k]
        assert abs(gs - s) <= 1e-5 * a + 1e-8 and abs(ga - a) <= 1e-5 * a + 1e-8, (k, s, a, gs, ga)


def test_recording_covers_the_memory_bank_and_both_evaluations(recorded):
    """The lock is only as good as what it saw: 24 logged iterations with the contrastive part, and the
    final metrics of a real evaluation."""
    for name in ("cavp", "tpavi"):
        assert sorted(map(int, recorded[name]["losses"])) == list(range(1, 25)), name
        assert 0 < recorded[name]["final"]["miou"] < 1
    assert all(" cp " in line for line in recorded["cavp"]["losses"].values())


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    sys.path.insert(0, ROOT)
    import vpo_make
    with tempfile.TemporaryDirectory() as tmp:
        assert vpo_make.main(["--synthetic", "--out", os.path.join(tmp, "vpo")] + TINY_ARGS) == 0
        runs = {name: record_run(name, os.path.join(tmp, "vpo"), os.path.join(tmp, name)) for name in CASES}
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    with open(LOCK, "w") as f:
        json.dump(runs, f, indent=1, sort_keys=True)
    print(f"wrote {LOCK}")
