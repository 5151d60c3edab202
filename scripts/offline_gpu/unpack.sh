#!/usr/bin/env bash
# Here: put sft.sh's returned pieces back together as a checkpoint folder (then SAE, joint, refit,
# calibrate and eval run as scripts/train.sh does, with --init TARGET).
#   scripts/offline_gpu/unpack.sh RET_DIR TARGET
set -euo pipefail
RET=${1:?usage: unpack.sh RET_DIR TARGET}; T=${2:?usage: unpack.sh RET_DIR TARGET}
mkdir -p "$T"
cat "$RET"/w[0-9][0-9] > "$T/model.safetensors"
tar -xf "$RET/meta.tar" -C "$T"
md5sum "$T/model.safetensors"
