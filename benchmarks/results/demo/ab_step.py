"""The step speed of two checkouts at 56 and 64 px crops (fp32, alternating rounds), as run for
benchmarks/README.md: /work/main at commit 5a6d7e6 ("new"), /work/wt/after at commit 7734d7c ("old");
other runs paused (kill -STOP). python ab_step.py ROUNDS"""
import sys, statistics
sys.path.insert(0, "/work/main/benchmarks")
from step_cost import alternate
common = ["--data", "vpo_msmi", "--data-root", "/work/main/data", "--no-amp", "--max-iters", "32", "--eval-every", "1000", "--overlays", "0", "--log-every", "1000"]
py = "/work/main/.venv/bin/python"
modes = {"new56": [py, "/work/main/cavp.py", *common], "old56": [py, "/work/wt/after/cavp.py", *common],
         "new64": [py, "/work/main/cavp.py", *common, "--crop", "64"], "old64": [py, "/work/wt/after/cavp.py", *common, "--crop", "64"]}
sp = alternate(modes, int(sys.argv[1]))
med = {k: statistics.median(v) for k, v in sp.items()}
print({k: round(v, 2) for k, v in med.items()}, "new/old 56:", round(med["new56"] / med["old56"], 3), "64:", round(med["new64"] / med["old64"], 3))
