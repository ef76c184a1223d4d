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
  # torch_npu's headers (acl/acl.h, torch_npu/csrc/core/npu/NPUStream.h, ...), for the compile
  # check of the Ascend host code (tests/test_cann_compile.py): only torch_npu/include/ of the
  # wheel that matches torch 2.13.0, into build/ (gitignored); skipped once extracted.
  npu_headers=build/torch_npu_headers
  if [[ ! -f "$npu_headers/torch_npu/include/acl/acl.h" ]]; then
    python -m pip download --quiet --disable-pip-version-check --no-deps torch-npu==2.13.0 \
      -d build/wheels
    python - "$npu_headers" build/wheels/torch_npu-2.13.0-*.whl <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[2]) as wheel:
    wheel.extractall(sys.argv[1], [n for n in wheel.namelist() if n.startswith("torch_npu/include/")])
PY
  fi
fi
python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
python -c "import pangu_fastkd; print('pangu_fastkd build:', pangu_fastkd.build_info())"
