# the defaults' quickstart (log-mels of the centre 1.5 s) in fp32 (--no-amp) and with AVX2 kernels
# only (no AVX-512: bf16 off by itself); nothing else running, both threads
cd "$(dirname "$0")/../../.."
t() { /usr/bin/time -f "wall %e s" "$@"; }
t .venv/bin/python cavp.py --data vpo_msmi --epochs 80 --no-amp --out /work/demo/fp32-q5-s0 \
  --overwrite > /work/demo/fp32-q5-s0.out 2>&1
t env ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python cavp.py --data vpo_msmi \
  --epochs 80 --out /work/demo/avx2-q5-s0 --overwrite > /work/demo/avx2-q5-s0.out 2>&1
