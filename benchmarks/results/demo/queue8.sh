# 300 x 32 log-mels (10 ms hop, 32 bands) at crop 64 (the final program), seeds 0-4, and the fifth
# seed of 150 x 64, bf16, two lanes
run() {  # tree name seed [flags]
  local tree=$1 name=$2 seed=$3; shift 3
  grep -q "^done in" /work/demo/$name-s$seed/log.txt 2>/dev/null && return
  cd /work/wt/$tree && /usr/bin/time -f "wall %e s" .venv/bin/python cavp.py --data vpo_msmi --epochs 80 --seed $seed --out /work/demo/$name-s$seed --overwrite "$@" > /work/demo/$name-s$seed.out 2>&1
}
export OMP_NUM_THREADS=1
(run head h300x32 0 --mel-hop 10; run head h300x32 2 --mel-hop 10; run head h300x32 4 --mel-hop 10) &
(run head h300x32 1 --mel-hop 10; run head h300x32 3 --mel-hop 10; run head mel150x64 4 --mel-bands 64) &
wait
