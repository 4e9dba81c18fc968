"""Cost of the README's demo step in fp32: cavp.py's training images/s on the built-in VPO-MSMI with
the built-in settings against the paper's audio front end, side by side.

Modes (all --no-amp, so the figures hold for a CPU without native bf16):
  builtin  the built-in defaults (150 x 64 log-mels of the centre 1.5 s, crops of the image side)
  paper    the same with --clip-ms 3000 (300 x 64 over the 3 s, App. B.1)
  avx2     builtin with PyTorch's and oneDNN's AVX2 kernels only (ATEN_CPU_CAPABILITY=avx2
           ONEDNN_MAX_CPU_ISA=AVX2): how a CPU without AVX-512 (such as an AMD EPYC before Zen 4)
           computes the step, at this machine's clock and memory
  before   (with --before DIR) DIR's cavp.py with its own defaults: another version of this
           repository, e.g. `git worktree add /tmp/before <commit>`
The modes alternate for --rounds rounds so that a background load hits all alike; each run's
metrics.json train_images_per_s (training time only, the first step left out) is collected, and
the medians and their ratios are printed.

    python benchmarks/demo_cost.py --data-root data --rounds 3 --iters 40 [--before /tmp/before]
"""
import argparse
import os
import statistics
import sys

from step_cost import ROOT, alternate


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data",
                   help="built-in VPO root (python vpo_make.py --synthetic --out data)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per mode")
    p.add_argument("--iters", type=int, default=40,
                   help="training iterations per run (the first is not timed)")
    p.add_argument("--before", default=None,
                   help="a checkout of another version whose cavp.py to compare with")
    args = p.parse_args()
    common = ["--data", "vpo_msmi", "--data-root", os.path.abspath(args.data_root), "--no-amp",
              "--max-iters", str(args.iters), "--eval-every", "1000", "--overlays", "0",
              "--log-every", "1000"]
    script = os.path.join(ROOT, "cavp.py")
    modes = {"builtin": [sys.executable, script, *common],
             "paper": [sys.executable, script, *common, "--clip-ms", "3000"],
             "avx2": ["env", "ATEN_CPU_CAPABILITY=avx2", "ONEDNN_MAX_CPU_ISA=AVX2", sys.executable,
                      script, *common]}
    if args.before:
        modes["before"] = [sys.executable, os.path.join(args.before, "cavp.py"), *common]
    speed = {k: statistics.median(v) for k, v in alternate(modes, args.rounds).items()}
    print("median img/s: " + ", ".join(f"{k} {v:.2f}" for k, v in speed.items()))
    print("step time vs builtin: " + ", ".join(f"{k} {speed['builtin'] / v:.2f}x"
                                               for k, v in speed.items() if k != "builtin"))


if __name__ == "__main__":
    main()
