# the final defaults' quickstart in fp32 (--no-amp), with AVX2 kernels only (no AVX-512: bf16 off
# by itself), and the step per log-mel size; nothing else running, both threads
cd "$(dirname "$0")/../../.."
t() { /usr/bin/time -f "wall %e s" "$@"; }
t .venv/bin/python cavp.py --data vpo_msmi --epochs 80 --no-amp --out /work/demo/fp32-q3-s0 \
  --overwrite > /work/demo/fp32-q3-s0.out 2>&1
t env ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python cavp.py --data vpo_msmi \
  --epochs 80 --out /work/demo/avx2-q3-s0 --overwrite > /work/demo/avx2-q3-s0.out 2>&1
.venv/bin/python benchmarks/results/demo/fe_cost.py 1 > /work/demo/fe_cost3.txt 2>&1
# afterwards: the final program with the previous 150 x 32 log-mels, fp32, idle
t .venv/bin/python cavp.py --data vpo_msmi --epochs 80 --no-amp --mel-bands 32 \
  --out /work/demo/fp32-q3-m32-s0 --overwrite > /work/demo/fp32-q3-m32-s0.out 2>&1
# then the defaults again, fp32, idle
t .venv/bin/python cavp.py --data vpo_msmi --epochs 80 --no-amp --out /work/demo/fp32-q4-s0 \
  --overwrite > /work/demo/fp32-q4-s0.out 2>&1
