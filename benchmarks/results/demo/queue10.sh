# The built-in audio's centre 1.5 s at a 10 ms hop (centre15.py): (A) 64 bands at crop 64, the
# defaults' cost; (B) 32 bands at crop 56, the cheaper step; bf16, seeds 0-4, two lanes of one
# thread each.
run() {  # name seed [flags]
  local name=$1 seed=$2; shift 2
  grep -q "^done in" /work/demo/$name-s$seed/log.txt 2>/dev/null && return
  cd /work/wt/exp && /usr/bin/time -f "wall %e s" .venv/bin/python benchmarks/results/demo/centre15.py --data vpo_msmi --epochs 80 --seed $seed --mel-hop 10 --out /work/demo/$name-s$seed --overwrite "$@" > /work/demo/$name-s$seed.out 2>&1
}
export OMP_NUM_THREADS=1
(for seed in 0 1 2 3 4; do run c15m64 $seed; done) &
(for seed in 0 1 2 3 4; do run c15m32c56 $seed --mel-bands 32 --crop 56; done) &
wait
