# 150 x 64 log-mels (20 ms hop, 64 bands) at crop 64, the final program, bf16, seeds 0-3 in two lanes
run() {  # tree name seed [flags]
  local tree=$1 name=$2 seed=$3; shift 3
  grep -q "^done in" /work/demo/$name-s$seed/log.txt 2>/dev/null && return
  cd /work/wt/$tree && /usr/bin/time -f "wall %e s" .venv/bin/python cavp.py --data vpo_msmi --epochs 80 --seed $seed --out /work/demo/$name-s$seed --overwrite "$@" > /work/demo/$name-s$seed.out 2>&1
}
export OMP_NUM_THREADS=1
(run final m64 0 --crop 64 --mel-bands 64; run final m64 2 --crop 64 --mel-bands 64) &
(run final m64 1 --crop 64 --mel-bands 64; run final m64 3 --crop 64 --mel-bands 64) &
wait
