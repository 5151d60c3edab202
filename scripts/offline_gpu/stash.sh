#!/usr/bin/env bash
# On the GPU machine: keep one uploaded piece of pack.sh's payload in /tmp/payload (it survives between
# calls while the machine stays up). With GEN=1, also start generating the ShapeWorld train split into
# /tmp/sw in its own process session, so it runs on while the next pieces arrive (N_TRAIN, default 16000; SEED, default 0),
# then what rest.sh needs: val and test (seed 0) in /tmp/sw-eval, N_FRESH (1500) refit scenes of FRESH_SEED (10; 6 trained the LM in session 24) in /tmp/sw-fresh.
#   scripts/offline_gpu/stash.sh PIECE
set -euo pipefail
mkdir -p /tmp/payload && cp "${1:?usage: stash.sh PIECE}" /tmp/payload/
if [ "${GEN:-0}" = 1 ] && [ ! -e /tmp/sw.log ]; then
  setsid nohup bash -c "cd '$(pwd)' && python3 -m training.data.shapeworld --out /tmp/sw --seed ${SEED:-0} --jobs $(nproc) \
    --split train --n ${N_TRAIN:-16000} && touch /tmp/sw/DONE \
    && python3 -m training.data.shapeworld --out /tmp/sw-eval --seed 0 --jobs $(nproc) --split val --n 300 && touch /tmp/sw-eval/DONE_val \
    && python3 -m training.data.shapeworld --out /tmp/sw-eval --seed 0 --jobs $(nproc) --split test --n 500 && touch /tmp/sw-eval/DONE_test \
    && python3 -m training.data.shapeworld --out /tmp/sw-fresh --seed ${FRESH_SEED:-10} --jobs $(nproc) --split train \
      --n ${N_FRESH:-1500} && touch /tmp/sw-fresh/DONE_train" > /tmp/sw.log 2>&1 < /dev/null &
fi
ls -l /tmp/payload
