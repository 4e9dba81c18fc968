# the paper's 300 x 64 log-mels (10 ms hop, 64 bands) with the final program (crop 64, no loader
# workers, evaluations at 40 and 80), bf16, one lane per seed of SEEDS (two at a time)
run() {  # tree name seed [flags]
  local tree=$1 name=$2 seed=$3; shift 3
  grep -q "^done in" /work/demo/$name-s$seed/log.txt 2>/dev/null && return
  cd /work/wt/$tree && /usr/bin/time -f "wall %e s" .venv/bin/python cavp.py --data vpo_msmi --epochs 80 --seed $seed --out /work/demo/$name-s$seed --overwrite "$@" > /work/demo/$name-s$seed.out 2>&1
}
export OMP_NUM_THREADS=1
seeds=${SEEDS:-0 1}
for seed in $seeds; do run atrous p300x64 $seed --mel-hop 10 --mel-bands 64 & done
wait
