#!/usr/bin/env bash
# On the GPU machine: keep one uploaded piece of pack.sh's payload in /tmp/payload (it survives between
# calls while the machine stays up). With GEN=1, also start generating the ShapeWorld train split into
# /tmp/sw in its own process session, so it runs on while the next pieces arrive (N_TRAIN, default 16000; SEED, default 0).
#   scripts/offline_gpu/stash.sh PIECE
set -euo pipefail
mkdir -p /tmp/payload && cp "${1:?usage: stash.sh PIECE}" /tmp/payload/
if [ "${GEN:-0}" = 1 ] && [ ! -e /tmp/sw.log ]; then
  setsid nohup bash -c "cd '$(pwd)' && python3 -m training.data.shapeworld --out /tmp/sw --seed ${SEED:-0} --jobs $(nproc) \
    --split train --n ${N_TRAIN:-16000} && touch /tmp/sw/DONE" > /tmp/sw.log 2>&1 < /dev/null &
fi
ls -l /tmp/payload
