#!/usr/bin/env bash
# What makes the stereo side learnable? One cavp.py run per lever, each alone on top of
# the paper's setting and all together, on a built-in VPO-MSMI where stereo is the main cue, with side accuracy
# (real and L/R-swapped channels) evaluated every EVAL_ITERS iterations so that it traces a curve.
#
#   bash benchmarks/stereo_probe.sh                             # one seed, ITERS iterations per run
#   JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/stereo_probe.sh    # two runs at a time, one thread each
#   ITERS=8000 SEEDS="0 1" OUT=runs/stereo-probe-8k bash benchmarks/stereo_probe.sh
#   EXTRA="--device cuda" bash benchmarks/stereo_probe.sh       # flags added to every run
#   python benchmarks/summarize.py --stereo-probe runs/stereo-probe   # the tables (also printed at the end)
#
# Data (vpo_make.py --synthetic --mi-share 1, N_TRAIN train / N_TEST test images, in DATA/{solo,mixed}): every
# VPO-MSMI image holds two instances of one class, centred in the left and the right 30 % of the width;
#   solo:  one of them sounds, nothing else (--mi-single-source): the audio names the class, only stereo the side;
#   mixed: plus 0-4 other sounding classes, as VPO-MSMI's multi-instance images.
# Runs (OUT/<run>-<data>-s<seed>): base = the paper's setting (no position code, an audio conv1 blind to the side
# at init, pans from the CSV, Eq. (1) matches on classes); pos, conv1, pan, side = base with one lever switched
# (--pos-enc sine, --audio-conv1 split, --pan crop, --match side); all = every lever. On mixed: all-long (all
# for LONG_ITERS iterations, first seed only: training length, past the ITERS the curves of the others show),
# all and base. KINDS picks the data (e.g. KINDS=mixed runs only the mixed part), ONLY the runs (a bash regex
# over the folder names, e.g. ONLY="all-long-mixed-s1").
# Model: the built-in defaults (ResNet-18 encoders from scratch, 64 px, output stride 16, batch 16): about 1.05 s per
# iteration with JOBS=2 and one thread each on a 2-core CPU, so ITERS=2048 is about 36 min a run.
#
# A finished run (its log.txt says "done in") is skipped, an interrupted one continues from its last.pt, so the
# script can be stopped and started again. Iterations are whole epochs of N_TRAIN / BATCH steps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
JOBS=${JOBS:-1}
OUT=${OUT:-runs/stereo-probe}
SEEDS=${SEEDS:-0}
KINDS=${KINDS:-solo mixed}
ONLY=${ONLY:-.*}
N_TRAIN=${N_TRAIN:-1024}
N_TEST=${N_TEST:-200}
DATA=${DATA:-data/stereo-probe-$N_TRAIN-$N_TEST}
BATCH=${BATCH:-16}
ITERS=${ITERS:-2048}
LONG_ITERS=${LONG_ITERS:-$((4 * ITERS))}   # 0: no all-long run
EVAL_ITERS=${EVAL_ITERS:-256}
EXTRA=${EXTRA:-}
# the paper's setting, and each lever's switch (override one to drop it, e.g. PAN="--pan csv")
BASE=${BASE-"--pos-enc none --audio-conv1 mean --pan csv --match class"}
POS=${POS-"--pos-enc sine"}
CONV1=${CONV1-"--audio-conv1 split"}
PAN=${PAN-"--pan crop"}
SIDE=${SIDE-"--match side"}

for kind in $KINDS; do
    flags=(--mi-share 1); [ "$kind" = solo ] && flags+=(--mi-single-source)
    [ -f "$DATA/$kind/vpo_summary.json" ] || $PY vpo_make.py --synthetic --out "$DATA/$kind" --n-train "$N_TRAIN" \
        --n-test "$N_TEST" --workers 1 "${flags[@]}" > /dev/null
done

per_epoch=$((N_TRAIN / BATCH))
epochs() { echo $(( ($1 + per_epoch - 1) / per_epoch )); }  # iterations -> whole epochs
EVAL_EVERY=$(( EVAL_ITERS / per_epoch > 0 ? EVAL_ITERS / per_epoch : 1 ))

train() {  # train NAME DATA_KIND ITERATIONS FLAGS...: one cavp.py run in OUT/NAME
    local name=$1 kind=$2 iters=$3; shift 3
    local dir=$OUT/$name
    [[ $name =~ ^($ONLY)$ ]] || return 0
    if grep -qs "done in" "$dir/log.txt"; then return; fi
    local resume=()
    [ -f "$dir/last.pt" ] && resume=(--resume "$dir/last.pt")
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    echo "$(date +%T) $name"
    # a failed run is reported and left out; the others go on
    # shellcheck disable=SC2086
    ( $PY cavp.py --data vpo_msmi --data-root "$DATA/$kind" --batch-size "$BATCH" --epochs "$(epochs "$iters")" \
        --eval-every "$EVAL_EVERY" --workers 0 --overlays 0 "$@" $EXTRA --out "$dir" "${resume[@]}" \
        > "$dir.log" 2>&1 || echo "$(date +%T) $name failed: see $dir.log" >&2 ) &
    [ "$JOBS" -gt 1 ] || wait $!
}

mkdir -p "$OUT"
# shellcheck disable=SC2086  # the flag strings split into words on purpose; a later flag overrides BASE's
# the most telling runs first (every lever, none), so that a stopped probe has them
for seed in $SEEDS; do
    if [[ " $KINDS " == *" solo "* ]]; then
        train all-solo-s$seed solo "$ITERS" --seed "$seed" $BASE $POS $CONV1 $PAN $SIDE
        train base-solo-s$seed solo "$ITERS" --seed "$seed" $BASE
        train pos-solo-s$seed solo "$ITERS" --seed "$seed" $BASE $POS
        train conv1-solo-s$seed solo "$ITERS" --seed "$seed" $BASE $CONV1
        train pan-solo-s$seed solo "$ITERS" --seed "$seed" $BASE $PAN
        train side-solo-s$seed solo "$ITERS" --seed "$seed" $BASE $SIDE
    fi
    if [[ " $KINDS " == *" mixed "* ]]; then
        if [ "$LONG_ITERS" -gt 0 ] && [ "$seed" = "${SEEDS%% *}" ]; then
            train all-long-mixed-s$seed mixed "$LONG_ITERS" --seed "$seed" $BASE $POS $CONV1 $PAN $SIDE
        fi
        train all-mixed-s$seed mixed "$ITERS" --seed "$seed" $BASE $POS $CONV1 $PAN $SIDE
        train base-mixed-s$seed mixed "$ITERS" --seed "$seed" $BASE
    fi
done
wait
$PY benchmarks/summarize.py --stereo-probe "$OUT"
