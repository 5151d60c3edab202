#!/usr/bin/env bash
# On the GPU machine, in a call right after sft.sh (same warm machine): the rest of the recipe on the device, so
# that nothing after the SFT needs this repository's CPU (an AVX2-only CPU without bf16, as in session 21, would
# take hours for it). From $RUN/sft/model: the STAGES (default "sae joint refit"; SAE and joint on the SFT scenes
# $SW, the heads refit on N_FRESH scenes of FRESH_SEED, never seen by the language model), the threshold calibrated
# on val and the test split scored (val and test: seed 0, the README's files).
# What comes back in RET_DIR is at most 7 files (the device returns 8): the fp16 checkpoint as pieces w00, w01, ...
# plus meta.tar (unpack.sh RET_DIR TARGET joins them), calibration.json, eval_test.json and logs.tar (every stage's
# log). The last stage's model is written there first, so a calibrate or eval that runs out of WALL still returns
# trained weights (uncalibrated: meta.tar then has no calibration in its config).
#   SAE_MIN=0.5 JOINT_MIN=1.5 REFIT_MIN=1.5 WALL=420 scripts/offline_gpu/rest.sh RET_DIR
# STAGES="refit" keeps the SAE the SFT trained its heads against (the SFT stage trains every part but the SAE), so the
# heads need not learn a new concept space in the few minutes a lease leaves.
# Extra options per stage: SAE_SET, JOINT_SET, REFIT_SET (e.g. "--set limit=8"); PRESET (smol-gpu);
# SITE (the unpacked packages sft.sh installed, /tmp/site; empty: the current environment).
set -u
RET=${1:?usage: rest.sh RET_DIR}
T0=$(date +%s); RUN=${RUN:-/tmp/run}; SW=${SW:-/tmp/sw}; EV=${EV:-/tmp/sw-eval}; FRESH=${FRESH:-/tmp/sw-fresh}
PRESET=${PRESET:-smol-gpu}; JOBS=${JOBS:-$(nproc)}; SITE=${SITE-/tmp/site}; STAGES=${STAGES:-sae joint refit}
LOGS=$(mktemp -d)
mkdir -p "$RET"
trap 'tar -C "$LOGS" -cf "$RET/logs.tar" .; ls -l "$RET"; echo "rest.sh ended after $(( $(date +%s) - T0 )) s"' EXIT
[ -n "$SITE" ] && export PYTHONPATH="$SITE"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 SEGCOMPASS_CACHE=${SEGCOMPASS_CACHE:-/tmp/cache}
[ -d "$RUN/sft/model" ] || { echo "no SFT checkpoint in $RUN/sft/model (run sft.sh first)"; exit 3; }
left() { echo $(( ${WALL:-420} - ($(date +%s) - T0) )); }
# shellcheck source=scripts/offline_gpu/pieces.sh
. "$(dirname "$0")/pieces.sh"  # fp16, ship
# generate SPLIT of N scenes of SEED into OUT, unless stash.sh (GEN=1) already did (its DONE_<split> marker)
gen() { [ -f "$1/DONE_$2" ] || { python3 -m training.data.shapeworld --out "$1" --split "$2" --n "$3" --seed "$4" \
  --jobs "$JOBS" > /dev/null 2>&1 && touch "$1/DONE_$2"; }; }
gen "$EV" val "${N_VAL:-300}" 0 & gen "$EV" test "${N_TEST:-500}" 0 & gen "$FRESH" train "${N_FRESH:-1500}" "${FRESH_SEED:-10}" &
wait
echo "data after $(( $(date +%s) - T0 )) s"
prev="$RUN/sft/model"
for name in $STAGES; do
  case $name in
    sae) data=$SW; minutes=${SAE_MIN:-0.5}; extra=${SAE_SET:-} ;;
    joint) data=$SW; minutes=${JOINT_MIN:-1.5}; extra=${JOINT_SET:-} ;;
    refit) data=$FRESH; minutes=${REFIT_MIN:-1.5}; extra="--set limit=${N_FRESH:-1500} ${REFIT_SET:-}" ;;
    *) echo "unknown stage $name"; exit 2 ;;
  esac
  echo "$name: start at $(( $(date +%s) - T0 )) s"
  # shellcheck disable=SC2086  # $extra holds several options
  timeout "$(left)" python3 -m training "$name" --preset "$PRESET" --init "$prev" --run "$RUN/$name" --data "$data" \
    --set minutes="$minutes" $extra > "$LOGS/$name.log" 2>&1 || { echo "$name failed ($?)"; tail -5 "$LOGS/$name.log"; exit 4; }
  prev="$RUN/$name/model"
done
echo "fp16 copy of $prev at $(( $(date +%s) - T0 )) s"
fp16 "$prev" "$RUN/last" 2> "$LOGS/fp16.log" && ship "$RUN/last" "$RET" || exit 5
echo "calibrate: start at $(( $(date +%s) - T0 )) s"
rm -rf "$RUN/final"
timeout "$(left)" python3 -m training calibrate --checkpoint "$prev" --data "$EV" --split val \
  --out-checkpoint "$RUN/final" --dtype fp16 --batch-size 64 > "$RET/calibration.json" 2> "$LOGS/calibrate.log" || exit 6
ship "$RUN/final" "$RET"
echo "eval: start at $(( $(date +%s) - T0 )) s"
timeout "$(left)" python3 -m training eval --checkpoint "$RUN/final" --data "$EV" --split test --batch-size 64 \
  --out "$RET/eval_test.json" > /dev/null 2> "$LOGS/eval.log" || exit 7
cat "$RET/eval_test.json"
