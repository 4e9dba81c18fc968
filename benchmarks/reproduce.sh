#!/usr/bin/env bash
# Re-runs every experiment of the README section "Paper claims on the built-in VPO" and prints its tables.
#
#   bash benchmarks/reproduce.sh                       # all of it
#   bash benchmarks/reproduce.sh claims                # items 1-5 (Tables 4, 5, 8, Figs. 1, 6, 7), ~2 h on 2 CPU cores
#   bash benchmarks/reproduce.sh readings              # readings of Eq. (1)-(3) and stereo vs mono (39 runs)
#   OUT=runs/repro2 SEEDS="2 3" bash benchmarks/reproduce.sh claims
#   JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/reproduce.sh readings   # two runs at a time, one thread each: ~2.3 h
#   AVSBENCH=/data/AVSBench VGGSOUND=/data/VGGSound bash benchmarks/reproduce.sh avsmss   # CAVP Sec. 5.2, on a GPU
#   JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/reproduce.sh stereo    # stereo vs mono, CAVP vs SupCon
#   ONLY="(stereo|mono)-msmi-s1" bash benchmarks/reproduce.sh stereo  # only the runs whose folder name matches
#
# Every run gets its own folder OUT/<method>-<subset>-s<seed>; a finished run (its log.txt says "done in")
# is skipped, an interrupted one continues from its last.pt, so the script can be stopped and started again.
# Same budget for every method: ResNet-18 image and audio encoders from scratch, the built-in 64 px images,
# EPOCHS epochs, the seeds in SEEDS; each method keeps its own paper's optimiser recipe (README).
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
PY=${PYTHON:-python}
JOBS=${JOBS:-1}
ONLY=${ONLY:-.*}  # a bash regex over the run folder names: the runs it does not match are left out

train() {  # train NAME SCRIPT ARGS...: one training run in OUT/NAME
    local name=$1 script=$2; shift 2
    local dir=$OUT/$name
    [[ $name =~ ^($ONLY)$ ]] || return 0
    if grep -qs "done in" "$dir/log.txt"; then return; fi
    local resume=()
    [ -f "$dir/last.pt" ] && resume=(--resume "$dir/last.pt")
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    echo "$(date +%T) $name"
    # a failed run is reported and left out; the others go on
    ( $PY "$script" "$@" --epochs "$EPOCHS" --eval-every "$EVAL_EVERY" --out "$dir" "${resume[@]}" > "$dir.log" 2>&1 \
        || echo "$(date +%T) $name failed: see $dir.log" >&2 ) &
    [ "$JOBS" -gt 1 ] || wait $!
}

if [ "$PART" = avsmss ]; then
# CAVP Sec. 5.2: TPAVI (tpavi.py, the AVS recipe of S4) on AVSBench S4 and on AVS-M-SS, S4 with each clip's audio
# replaced by a VGGSound clip of its category (vpo_make.py --avs-mss, built into OUT_AVSMSS/avs-mss), with the seeds
# in SEEDS_AVSMSS; summarize.py prints mean +- std of the test M_J / M_F and the two-sided t-tests. Needs AVSBENCH
# (the folder with Single-source/) and VGGSOUND (vggsound.csv, audio/), absolute or relative to the repository root.
# AVSMSS_ARGS: more tpavi.py flags for every run (e.g. "--backbone resnet18 --pretrained none" offline).
: "${AVSBENCH:?set AVSBENCH to the AVSBench root (with Single-source/) and VGGSOUND to the VGGSound root}"
: "${VGGSOUND:?set VGGSOUND to the VGGSound root (vggsound.csv, audio/)}"
OUT=${OUT_AVSMSS:-runs/avsmss}
EPOCHS=${EPOCHS_AVSMSS:-15}  # tpavi.py's S4 default (the released S4 script)
EVAL_EVERY=1
SEEDS=${SEEDS_AVSMSS:-"0 1 2"}
read -r -a EXTRA <<< "${AVSMSS_ARGS:-}"
mkdir -p "$OUT"
[ -f "$OUT/avs-mss/avs_mss_summary.json" ] || $PY vpo_make.py --avs-mss --avsbench "$AVSBENCH" --vggsound "$VGGSOUND" \
    --out "$OUT/avs-mss" | tee "$OUT/avs-mss.log"
for seed in $SEEDS; do
    train tpavi-s4-s$seed tpavi.py --data avsbench_s4 --data-root "$AVSBENCH" --seed "$seed" "${EXTRA[@]}"
    train tpavi-avsmss-s$seed tpavi.py --data avsbench_s4 --data-root "$OUT/avs-mss" --seed "$seed" "${EXTRA[@]}"
done
wait
$PY benchmarks/summarize.py --avsmss "$OUT"
exit 0
fi
if [ "$PART" = stereo ]; then
# Stereo vs mono on VPO-MSMI at a budget past the point where benchmarks/stereo_probe.sh's models
# start to use the side, with the probe's levers (a position code, pans that follow the crop:
# LEVERS) and with the paper's setting (neither: PAPER, the defaults), and CAVP's mining vs
# SupCon at the same budget. Built-in VPO with N_TRAIN_STEREO training images per subset (8x the default 128, as
# the probe) and the default 300 test images; ITERS_STEREO iterations of batch 16 (whole epochs); evaluation at
# the end only, with the twin and L/R-swap metrics.
# One seed's runs come before the next seed's, so a stopped run set stays balanced. Then "curve": the default
# stereo model (first seed) for CURVE_ITERS iterations, evaluated every 256, to see whether the side comes later.
N_TRAIN=${N_TRAIN_STEREO:-1024}
DATA=data/vpo-$N_TRAIN
OUT=${OUT_STEREO:-runs/stereo}
epochs() { echo $(( ($1 * 16 + N_TRAIN - 1) / N_TRAIN )); }  # iterations of batch 16 -> whole epochs
EPOCHS=$(epochs "${ITERS_STEREO:-768}")
EVAL_EVERY=$EPOCHS
SEEDS=${SEEDS_STEREO:-"0 1 2"}
LEVERS=(--pos-enc sine --pan crop)
PAPER=(--pos-enc none --pan csv)
BASE=(--data vpo_msmi --data-root "$DATA" --workers 0 --overlays 0)
[ -f "$DATA/vpo_summary.json" ] || $PY vpo_make.py --synthetic --out "$DATA" --n-train "$N_TRAIN" > /dev/null
mkdir -p "$OUT"
for seed in $SEEDS; do
    common=("${BASE[@]}" --seed "$seed")
    train stereo-msmi-s$seed cavp.py "${common[@]}" "${LEVERS[@]}"
    train mono-msmi-s$seed cavp.py "${common[@]}" "${LEVERS[@]}" --mono
    train paper-msmi-s$seed cavp.py "${common[@]}" "${PAPER[@]}"
    train paper-mono-msmi-s$seed cavp.py "${common[@]}" "${PAPER[@]}" --mono
    train supcon-msmi-s$seed cavp.py "${common[@]}" "${LEVERS[@]}" --contrast supcon
done
seed=${SEEDS%% *}
EPOCHS=$(epochs "${CURVE_ITERS:-2048}") EVAL_EVERY=$(epochs 256) \
    train curve-msmi-s$seed cavp.py "${BASE[@]}" "${LEVERS[@]}" --seed "$seed"
wait
$PY benchmarks/summarize.py --stereo "$OUT"
exit 0
fi
[ -f data/vpo_summary.json ] || $PY vpo_make.py --synthetic --out data

if [ "$PART" = readings ] || [ "$PART" = all ]; then
# The readings of Eq. (1)-(3) for multi-source audio on VPO-MSMI, one change at a time against
# the baseline CAVP readings and SupCon, then the best combination, then stereo vs mono for it on
# every subset. Each seed's runs come before the next seed's, so a stopped run set stays balanced.
OUT=${OUT_READINGS:-runs/readings}
EPOCHS=${EPOCHS_READINGS:-12}
EVAL_EVERY=$EPOCHS
SEEDS=${SEEDS_READINGS:-"0 1 2"}
BEST=${BEST-"--positives label --bg-groups one"}   # picked from the single-change runs (README); BEST="" stops after them
# the baseline readings (the "cavp" runs); each change below overrides one of them
BEFORE=(--positives set --unknown mismatched --bg-groups label --match class --bank-sources single)
mkdir -p "$OUT"
for seed in $SEEDS; do
    common=(--data vpo_msmi --seed "$seed" --workers 0 --overlays 0 "${BEFORE[@]}")
    train cavp-msmi-s$seed cavp.py "${common[@]}"
    train supcon-msmi-s$seed cavp.py "${common[@]}" --contrast supcon
    train poslabel-msmi-s$seed cavp.py "${common[@]}" --positives label
    train unkliteral-msmi-s$seed cavp.py "${common[@]}" --unknown literal
    train bgone-msmi-s$seed cavp.py "${common[@]}" --bg-groups one
    train side-msmi-s$seed cavp.py "${common[@]}" --match side
    train bankall-msmi-s$seed cavp.py "${common[@]}" --bank-sources all
done
[ -n "$BEST" ] || SEEDS=""
for seed in $SEEDS; do
    for s in msmi ms ss; do
        common=(--data vpo_$s --seed "$seed" --workers 0 --overlays 0 "${BEFORE[@]}")
        # shellcheck disable=SC2086
        train best-$s-s$seed cavp.py "${common[@]}" $BEST
        # shellcheck disable=SC2086
        train best-mono-$s-s$seed cavp.py "${common[@]}" ${BEST//--match side/} --mono
    done
done
wait
$PY benchmarks/summarize.py --readings "$OUT"
fi
[ "$PART" = claims ] || [ "$PART" = all ] || exit 0

OUT=${OUT:-runs/repro}
EPOCHS=${EPOCHS:-30}
EVAL_EVERY=10
SEEDS=${SEEDS:-"0 1"}
FIRST=${SEEDS%% *}
mkdir -p "$OUT"

for seed in $SEEDS; do
    for s in ss ms msmi; do  # item 1 (Table 4) and item 2 (Fig. 7 / Table 8)
        train cavp-$s-s$seed cavp.py --data vpo_$s --seed "$seed"
        train tpavi-$s-s$seed tpavi.py --data vpo_$s --seed "$seed" --workers 0
        train cavp-mono-$s-s$seed cavp.py --data vpo_$s --seed "$seed" --mono
    done
    if [ "$seed" = "$FIRST" ]; then  # items 3 (Table 5) and 4 (Fig. 6) on VPO-MSMI
        train tpavifusion-msmi-s$seed cavp.py --data vpo_msmi --seed "$seed" --fusion tpavi --contrast none
        train ca-msmi-s$seed cavp.py --data vpo_msmi --seed "$seed" --contrast none
        train supcon-msmi-s$seed cavp.py --data vpo_msmi --seed "$seed" --contrast supcon
        train softmax-msmi-s$seed cavp.py --data vpo_msmi --seed "$seed" --attn softmax
        train minmax-msmi-s$seed cavp.py --data vpo_msmi --seed "$seed" --attn minmax
    fi
done
for seed in $SEEDS; do  # like-for-like control of item 1: TPAVI-like fusion with CAVP's optimiser
    for s in ss ms msmi; do
        train tpavifusion-$s-s$seed cavp.py --data vpo_$s --seed "$seed" --fusion tpavi --contrast none
    done
done
for seed in $SEEDS; do  # Table 5 rows 2-3 with every seed (the first seed ran above)
    train ca-msmi-s$seed cavp.py --data vpo_msmi --seed "$seed" --contrast none
    train supcon-msmi-s$seed cavp.py --data vpo_msmi --seed "$seed" --contrast supcon
done
wait

# item 5: every trained model (last.pt) tested with the real audio, with silence and with a clip of a class
# that is absent from the image; writes eval-real.json, eval-silence.json, eval-absent.json beside metrics.json
for dir in "$OUT"/*/; do
    dir=${dir%/}
    name=$(basename "$dir")
    script=cavp.py; [ "${name%%-*}" = tpavi ] && script=tpavi.py
    subset=${name%-s*}; subset=${subset##*-}
    for audio in real silence absent; do
        [ -f "$dir/eval-$audio.json" ] || $PY "$script" --data "vpo_$subset" --eval-only --ckpt "$dir/last.pt" \
            --eval-audio "$audio" --overlays 0 --out "$dir" > "$dir/eval-$audio.log" 2>&1
    done
done
$PY benchmarks/summarize.py "$OUT"
