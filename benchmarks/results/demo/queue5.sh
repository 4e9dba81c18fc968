# lane A: 150 x 32 log-mel at crop 64 (lever separation); lane B: seeds 3-4 of before / after (bf16)
run() {  # tree name seed [flags]
  local tree=$1 name=$2 seed=$3; shift 3
  grep -q "^done in" /work/demo/$name-s$seed/log.txt 2>/dev/null && return
  cd /work/wt/$tree && /usr/bin/time -f "wall %e s" .venv/bin/python cavp.py --data vpo_msmi --epochs 80 --seed $seed --out /work/demo/$name-s$seed --overwrite "$@" > /work/demo/$name-s$seed.out 2>&1
}
export OMP_NUM_THREADS=1
(run after c64 0 --crop 64; run after c64 1 --crop 64; run after c64 2 --crop 64; run after c56 5) &
(run before before 3; run after c56 3; run before before 4; run after c56 4) &
wait
