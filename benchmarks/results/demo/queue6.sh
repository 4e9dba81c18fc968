# the final program (commit 5a6d7e6) at crop 64 (the image side), bf16, seeds 0-4, in two lanes
# that start when the earlier queue's runs of each lane end
run() {  # tree name seed [flags]
  local tree=$1 name=$2 seed=$3; shift 3
  grep -q "^done in" /work/demo/$name-s$seed/log.txt 2>/dev/null && return
  cd /work/wt/$tree && /usr/bin/time -f "wall %e s" .venv/bin/python cavp.py --data vpo_msmi --epochs 80 --seed $seed --out /work/demo/$name-s$seed --overwrite "$@" > /work/demo/$name-s$seed.out 2>&1
}
wait_done() { until grep -q "^done in" /work/demo/$1/log.txt 2>/dev/null; do sleep 10; done; }
export OMP_NUM_THREADS=1
(wait_done c64-s2; run final f64 0 --crop 64; run final f64 2 --crop 64; run final f64 4 --crop 64) &
(wait_done before-s4; run final f64 1 --crop 64; run final f64 3 --crop 64) &
wait
