"""Run a training script in a subprocess, as a user would, and compare run folders (shared by the
training-script tests)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def command(script, argv, torchrun=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return cmd + [os.path.join(ROOT, script), *map(str, argv)]


def run_script(script, *argv, torchrun=False, check=True):
    """`python SCRIPT ARGV` (or torchrun with 2 CPU processes); asserts exit 0 when `check`."""
    proc = subprocess.run(command(script, argv, torchrun), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def kill_after_first_epoch(script, argv, out):
    """Start `python SCRIPT ARGV` and SIGKILL it as soon as OUT/last.pt appears (the end of the first
    epoch, while the second runs); returns that checkpoint, which must still load."""
    proc = subprocess.Popen(command(script, argv), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not os.path.isfile(os.path.join(out, "last.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return torch.load(os.path.join(out, "last.pt"), weights_only=True)


def logged_losses(out):
    """iteration -> the loss part ('loss ... (...)') of its line in OUT/log.txt."""
    with open(os.path.join(out, "log.txt")) as f:
        return dict(re.findall(r"^ep \d+/\d+ it (\d+)/\d+ (loss .*?) lr ", f.read(), re.M))


def assert_same_run(a, b):
    """The final weights, every logged loss and the final metrics of run folders a and b are bit-for-bit equal."""
    wa, wb = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (a, b))
    assert wa["iteration"] == wb["iteration"] and wa["model"].keys() == wb["model"].keys()
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"]), "the final weights differ"
    la, lb = logged_losses(a), logged_losses(b)
    assert la == lb and len(la) == wa["iteration"]
    finals = []
    for d in (a, b):
        with open(os.path.join(d, "metrics.json")) as f:
            finals.append(json.load(f)["final"])
    assert finals[0] == finals[1]


A_DAY = 86400.0


def add_a_day(ckpt_path):
    """Add a day to the wall time that checkpoint CKPT_PATH has recorded, as if its run had taken that long
    before it stopped: a run resumed from it must then report over a day."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert 0 < ckpt["elapsed_s"] < 600
    ckpt["elapsed_s"] += A_DAY
    torch.save(ckpt, ckpt_path)


def assert_wall_time_over_a_day(out):
    """metrics.json's wall_time_s and the log's last 'done in N s' count the day that add_a_day put in the
    checkpoint, plus this process's minutes."""
    with open(os.path.join(out, "metrics.json")) as f:
        wall = json.load(f)["wall_time_s"]
    with open(os.path.join(out, "log.txt")) as f:
        done = int(re.findall(r"^done in (\d+) s", f.read(), re.M)[-1])
    assert A_DAY < wall < A_DAY + 600 and A_DAY < done < A_DAY + 600, (wall, done)
