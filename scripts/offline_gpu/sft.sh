#!/usr/bin/env bash
# On the GPU machine, after stash.sh has kept every piece: unpack the payload into /tmp/site (PYTHONPATH),
# wait for /tmp/sw, run the SFT stage (smol-gpu preset) from the packed checkpoint for MIN minutes, and write
# the trained weights to RET_DIR as fp16 pieces of 15 MB (w00, w01, ...) plus meta.tar and sft.log;
# unpack.sh puts them back together here.
#   MIN=7.8 WALL=555 scripts/offline_gpu/sft.sh RET_DIR [extra `training sft` options]
set -u
RET=${1:?usage: sft.sh RET_DIR [sft options]}; shift
T0=$(date +%s); RUN=${RUN:-/tmp/run/sft}; mkdir -p "$RET" /tmp/unpacked /tmp/site
cat /tmp/payload/c[0-9][0-9] | tar -xf - -C /tmp/unpacked || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  /tmp/unpacked/whl/*.whl || exit 4
cp -r /tmp/unpacked/site/* /tmp/site/
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 SEGCOMPASS_CACHE=/tmp/cache
for _ in $(seq 150); do [ -f /tmp/sw/DONE ] && break; sleep 2; done
[ -f /tmp/sw/DONE ] || { echo "no data in /tmp/sw (stash.sh with GEN=1 starts it)"; exit 5; }
echo "ready after $(( $(date +%s) - T0 )) s"
# WALL: a hard stop so the weights still come back within the call's limit (the last save_every checkpoint)
sft() { timeout "$(( ${WALL:-555} - ($(date +%s) - T0) ))" python3 -m training sft --preset smol-gpu --threads 0 \
  --head segcompass --run "$RUN" --data /tmp/sw --init /tmp/unpacked/init --set minutes="${MIN:-7.8}" \
  --set lr="${LR:-1e-3}" --set save_every=100 \
  --set cache_examples=false "$@"; }
sft "$@" > "$RET/sft.log" 2>&1; rc=$?
echo "sft exit $rc after $(( $(date +%s) - T0 )) s"
# the background batch prefetch (on by default on a GPU) had not run on one before session 24: if the SFT broke
# before its first checkpoint, once more without it
if [ $rc != 0 ] && [ $rc != 124 ] && [ ! -d "$RUN/model" ]; then
  tail -3 "$RET/sft.log"; mv "$RET/sft.log" "$RET/sft_first.log"; rm -rf "$RUN"
  sft "$@" --set prefetch=off > "$RET/sft.log" 2>&1; echo "sft (prefetch off) exit $? after $(( $(date +%s) - T0 )) s"
fi
# fp16 pieces (pieces.sh); sft_config.json rides along
# shellcheck source=scripts/offline_gpu/pieces.sh
. "$(dirname "$0")/pieces.sh"
fp16 "$RUN/model" /tmp/ret || exit 6
cp "$RUN/sft_config.json" /tmp/ret/
ship /tmp/ret "$RET"; ls -l "$RET"; echo "done after $(( $(date +%s) - T0 )) s"
