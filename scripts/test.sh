#!/usr/bin/env bash
# Install everything the tests need (pip packages; Debian's chromium for the browser test) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False NO_PROXY=127.0.0.1,localhost
exec python -m pytest -q "$@"
