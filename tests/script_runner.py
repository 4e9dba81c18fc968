"""Run a training script in a subprocess, as a user would (shared by the training-script tests)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def run_script(script, *argv, torchrun=False, check=True):
    """`python SCRIPT ARGV` (or torchrun with 2 CPU processes); asserts exit 0 when `check`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    proc = subprocess.run(cmd + [os.path.join(ROOT, script), *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
