#!/usr/bin/env bash
# On the GPU machine, in a call right after sft.sh (same warm machine): the rest of the recipe on the device, so
# that nothing after the SFT needs this repository's CPU (an AVX2-only CPU without bf16, as in session 21, would
# take hours for it). From $RUN/sft/model: SAE and joint on the SFT scenes ($SW), the heads refit on N_FRESH
# scenes of FRESH_SEED (never seen by the language model), the threshold calibrated on val and the test split
# scored (val and test: seed 0, the README's files); the calibrated fp16 checkpoint comes back in RET_DIR as
# pieces (w00, ...) plus meta.tar, with calibration.json, eval_test.json and the stage logs.
# unpack.sh RET_DIR TARGET puts the checkpoint together here.
#   SAE_MIN=0.5 JOINT_MIN=1.5 REFIT_MIN=1.5 WALL=420 scripts/offline_gpu/rest.sh RET_DIR
# Extra options per stage: SAE_SET, JOINT_SET, REFIT_SET (e.g. "--set limit=8"); PRESET (smol-gpu);
# SITE (the unpacked packages sft.sh installed, /tmp/site; empty: the current environment).
set -u
RET=${1:?usage: rest.sh RET_DIR}
T0=$(date +%s); RUN=${RUN:-/tmp/run}; SW=${SW:-/tmp/sw}; EV=${EV:-/tmp/sw-eval}; FRESH=${FRESH:-/tmp/sw-fresh}
PRESET=${PRESET:-smol-gpu}; JOBS=${JOBS:-$(nproc)}; SITE=${SITE-/tmp/site}
mkdir -p "$RET"
[ -n "$SITE" ] && export PYTHONPATH="$SITE"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 SEGCOMPASS_CACHE=${SEGCOMPASS_CACHE:-/tmp/cache}
[ -d "$RUN/sft/model" ] || { echo "no SFT checkpoint in $RUN/sft/model (run sft.sh first)"; exit 3; }
left() { echo $(( ${WALL:-420} - ($(date +%s) - T0) )); }
stage() {  # stage NAME ARGS...: run one `python -m training` stage within what is left of WALL, log to RET
  local name=$1; shift
  echo "$name: start at $(( $(date +%s) - T0 )) s"
  timeout "$(left)" python3 -m training "$name" "$@" > "$RET/$name.log" 2>&1 || { echo "$name failed ($?)"; tail -5 "$RET/$name.log"; exit 4; }
}
gen() { python3 -m training.data.shapeworld --out "$1" --split "$2" --n "$3" --seed "$4" --jobs "$JOBS" > /dev/null 2>&1; }
gen "$EV" val "${N_VAL:-300}" 0 & gen "$EV" test "${N_TEST:-500}" 0 & gen "$FRESH" train "${N_FRESH:-1500}" "${FRESH_SEED:-6}" &
wait
echo "data after $(( $(date +%s) - T0 )) s"
# shellcheck disable=SC2086  # the *_SET variables hold several options
stage sae --preset "$PRESET" --init "$RUN/sft/model" --run "$RUN/sae" --data "$SW" --set minutes="${SAE_MIN:-0.5}" ${SAE_SET:-}
# shellcheck disable=SC2086
stage joint --preset "$PRESET" --init "$RUN/sae/model" --run "$RUN/joint" --data "$SW" --set minutes="${JOINT_MIN:-1.5}" ${JOINT_SET:-}
# shellcheck disable=SC2086
stage refit --preset "$PRESET" --init "$RUN/joint/model" --run "$RUN/refit" --data "$FRESH" \
  --set limit="${N_FRESH:-1500}" --set minutes="${REFIT_MIN:-1.5}" ${REFIT_SET:-}
echo "calibrate: start at $(( $(date +%s) - T0 )) s"
rm -rf "$RUN/final"
timeout "$(left)" python3 -m training calibrate --checkpoint "$RUN/refit/model" --data "$EV" --split val \
  --out-checkpoint "$RUN/final" --dtype fp16 --batch-size 64 > "$RET/calibration.json" 2> "$RET/calibrate.log" || exit 5
echo "eval: start at $(( $(date +%s) - T0 )) s"
timeout "$(left)" python3 -m training eval --checkpoint "$RUN/final" --data "$EV" --split test --batch-size 64 \
  --out "$RET/eval_test.json" > /dev/null 2> "$RET/eval.log" || exit 6
split -b 15000000 -d "$RUN/final/model.safetensors" "$RET/w"
tar -C "$RUN/final" --exclude model.safetensors -cf "$RET/meta.tar" .
md5sum "$RUN/final/model.safetensors"; cat "$RET/eval_test.json"; ls -l "$RET"
echo "done after $(( $(date +%s) - T0 )) s"
