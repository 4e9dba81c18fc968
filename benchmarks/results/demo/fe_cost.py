"""The quickstart's fp32 training step with each log-mel size of the whole 3 s (built-in
VPO-MSMI, --no-amp, 32 iterations, the first not timed), the sizes alternating for ROUNDS rounds:
python benchmarks/results/demo/fe_cost.py ROUNDS (from the repository root, data/ written)."""
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from step_cost import alternate  # noqa: E402

common = [sys.executable, os.path.join(ROOT, "cavp.py"), "--data", "vpo_msmi", "--data-root",
          os.path.join(ROOT, "data"), "--no-amp", "--max-iters", "32", "--eval-every", "1000",
          "--overlays", "0", "--log-every", "1000"]
three = ["--clip-ms", "3000"]  # the log-mels of the whole 3 s
modes = {"150x64": common + three + ["--mel-hop", "20"],
         "150x32": common + three + ["--mel-hop", "20", "--mel-bands", "32"],
         "300x32": common + three + ["--mel-bands", "32"], "300x64": common + three}
speed = {k: statistics.median(v) for k, v in alternate(modes, int(sys.argv[1])).items()}
print("median img/s: " + ", ".join(f"{k} {v:.2f}" for k, v in speed.items()))
print("step vs 150x32: " + ", ".join(f"{k} {speed['150x32'] / v:.3f}x" for k, v in speed.items()))
