"""Training throughput of tpavi.py vs cavp.py with identical settings, side by side.

Both scripts train --iters iterations on the same built-in VPO subset with the same backbone (the
built-in default, ResNet-18), crop (the built-in image size), batch size and loader workers; the runs
alternate (cavp, tpavi, cavp, tpavi, ...) for --rounds rounds so that a background load hits both alike,
and each run's metrics.json train_images_per_s (training time only, the first step left out) is
collected. Prints the median images/s of each and tpavi / cavp. Budget: tpavi >= 0.8x cavp.

    python benchmarks/throughput.py --data-root data --rounds 3 --iters 24
"""
import argparse
import os
import statistics
import sys

from step_cost import ROOT, alternate


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data", help="built-in VPO root (python vpo_make.py --synthetic --out data)")
    p.add_argument("--data", default="vpo_msmi", help="VPO subset")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per script")
    p.add_argument("--iters", type=int, default=24, help="training iterations per run (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step, both scripts")
    p.add_argument("--workers", type=int, default=2, help="data loader workers, both scripts")
    p.add_argument("extra", nargs="*", help="further flags for both scripts, after --")
    args = p.parse_args()
    speed = alternate({script: [sys.executable, os.path.join(ROOT, f"{script}.py"), "--data", args.data,
                                "--data-root", args.data_root, "--batch-size", str(args.batch_size), "--workers",
                                str(args.workers), "--max-iters", str(args.iters), "--eval-every", "1000",
                                "--eval-batch-size", "16", "--overlays", "0", "--log-every", "1000", *args.extra]
                       for script in ("cavp", "tpavi")}, args.rounds)
    cavp, tpavi = statistics.median(speed["cavp"]), statistics.median(speed["tpavi"])
    print(f"median img/s: cavp {cavp:.2f}, tpavi {tpavi:.2f}; tpavi / cavp = {tpavi / cavp:.3f}")

if __name__ == "__main__":
    main()
