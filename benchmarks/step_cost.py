"""Cost of CAVP's contrastive term: training throughput of cavp.py with --contrast cavp vs none.

Runs the two modes alternately (same model, batch, data and seed), each for --iters training
iterations, --rounds times, and prints the median images/s of each and the step-time ratio.
Budget: the contrastive term and the re-pairing add at most 30 % to a training step.

    python benchmarks/step_cost.py --data-root data --rounds 3 --iters 30
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def alternate(commands, rounds):
    """Runs every command (name -> argv) in turn, --rounds times, each into a fresh --out folder, so that a
    background load hits all alike; returns name -> the runs' metrics.json train_images_per_s."""
    speed = {name: [] for name in commands}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, cmd in commands.items():
                out = os.path.join(tmp, f"{name}{r}")
                subprocess.run([*cmd, "--out", out], check=True, stdout=subprocess.DEVNULL)
                with open(os.path.join(out, "metrics.json")) as f:
                    speed[name].append(json.load(f)["train_images_per_s"])
                print(f"round {r + 1} {name:5s}: {speed[name][-1]:.2f} img/s", flush=True)
    return speed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data", help="built-in VPO root (python vpo_make.py --synthetic --out data)")
    p.add_argument("--data", default="vpo_msmi", help="VPO subset")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per mode")
    p.add_argument("--iters", type=int, default=30, help="training iterations per run (the first is not timed)")
    p.add_argument("extra", nargs="*", help="further cavp.py flags, after --")
    args = p.parse_args()
    speed = alternate({mode: [sys.executable, os.path.join(ROOT, "cavp.py"), "--data", args.data, "--data-root",
                              args.data_root, "--contrast", mode, "--max-iters", str(args.iters), "--overlays", "0",
                              "--log-every", "1000", *args.extra] for mode in ("none", "cavp")}, args.rounds)
    none, cavp = statistics.median(speed["none"]), statistics.median(speed["cavp"])
    print(f"median img/s: none {none:.2f}, cavp {cavp:.2f}; step time cavp / none = {none / cavp:.3f}")

if __name__ == "__main__":
    main()
