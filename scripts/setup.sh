#!/usr/bin/env bash
# Installs everything pangu_fastkd needs on a fresh machine and builds its C++ extension.
#   bash scripts/setup.sh          runtime: torch (CPU wheel), numpy, safetensors, the extension
#   bash scripts/setup.sh --dev    also the test and lint tools
# torch is pinned to 2.13.0: that CPU wheel is on this machine's disk, while any other torch
# requirement pulls a multi-GB CUDA build. The extension is built with --no-build-isolation so that
# it compiles against this torch instead of a second one installed into an isolated build env.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --disable-pip-version-check -r requirements.txt
if [[ "${1:-}" == "--dev" ]]; then
  python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
fi
python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
python -c "import pangu_fastkd; print('pangu_fastkd build:', pangu_fastkd.build_info())"
