"""The quickstart's fp32 training step with AVX2 kernels only (ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2: as a CPU without AVX-512 computes), the defaults against a 56 px crop,
32-band log-mels and both (built-in VPO-MSMI, --no-amp, 32 iterations, the first not timed), the
modes alternating for ROUNDS rounds:
python benchmarks/results/demo/avx2_modes.py ROUNDS (from the repository root, data/ written)."""
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from step_cost import alternate  # noqa: E402

common = ["env", "ATEN_CPU_CAPABILITY=avx2", "ONEDNN_MAX_CPU_ISA=AVX2", sys.executable,
          os.path.join(ROOT, "cavp.py"), "--data", "vpo_msmi", "--data-root", os.path.join(ROOT, "data"),
          "--no-amp", "--max-iters", "32", "--eval-every", "1000", "--overlays", "0", "--log-every", "1000"]
modes = {"base": common, "crop56": common + ["--crop", "56"], "mel32": common + ["--mel-bands", "32"],
         "c56m32": common + ["--crop", "56", "--mel-bands", "32"]}
speed = {k: statistics.median(v) for k, v in alternate(modes, int(sys.argv[1])).items()}
print("median img/s: " + ", ".join(f"{k} {v:.2f}" for k, v in speed.items()))
print("step vs base: " + ", ".join(f"{k} {speed['base'] / v:.3f}x" for k, v in speed.items()))
