#!/usr/bin/env bash
# Set up the peer tools used by the side-by-side benchmarks. Idempotent: re-running it only
# installs what is missing.
#
#   benchmarks/setup_peers.sh            # llm-compressor venv + torchao
#
# * llm-compressor lives in its OWN venv ($LLMC_VENV, default .venv-llmc at the repo root) so
#   its transformers / compressed-tensors pins never touch the system env. torch==2.13.0 is
#   installed first (the CPU wheel on this machine's disk); any other torch pin would download
#   gigabytes, so we check afterwards that it is still 2.13.0.
# * torchao goes into the SYSTEM env only if `pip install --dry-run torchao` would leave torch
#   alone; otherwise into the llmc venv.
# * Versions are written to benchmarks/.cache/peer_versions.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LLMC_VENV="${LLMC_VENV:-$ROOT/.venv-llmc}"
SYS_PY="${SYS_PY:-python}"
TORCH_PIN="torch==2.13.0"
CACHE="$ROOT/benchmarks/.cache"
mkdir -p "$CACHE"
log() { echo "[setup_peers] $*" >&2; }

# ---- llm-compressor venv -------------------------------------------------------------------
if [ ! -x "$LLMC_VENV/bin/python" ]; then
  log "creating venv $LLMC_VENV"
  "$SYS_PY" -m venv "$LLMC_VENV"
fi
VPY="$LLMC_VENV/bin/python"
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  log "installing $TORCH_PIN into the llmc venv"
  "$VPY" -m pip install -q "$TORCH_PIN"
fi
if ! "$VPY" -c "import llmcompressor" 2>/dev/null; then
  log "installing llmcompressor into the llmc venv (keeping $TORCH_PIN)"
  "$VPY" -m pip install -q llmcompressor "$TORCH_PIN"
fi
"$VPY" -c "import torch, sys; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
  || { log "ERROR: llmcompressor changed torch in the venv"; exit 1; }

# ---- torchao -------------------------------------------------------------------------------
TORCHAO_WHERE=""
if "$SYS_PY" -c "import torchao" 2>/dev/null; then
  TORCHAO_WHERE="system"
elif "$VPY" -c "import torchao" 2>/dev/null && [ -f "$CACHE/torchao_in_llmc_venv" ]; then
  TORCHAO_WHERE="llmc-venv"
else
  log "checking whether torchao would change torch in the system env"
  DRY="$("$SYS_PY" -m pip install --dry-run torchao 2>&1 || true)"
  echo "$DRY" > "$CACHE/torchao_dry_run.txt"
  if echo "$DRY" | grep -E "^Would install" | grep -qE "(^| )torch-[0-9]"; then
    log "torchao would change the system torch -> installing it into the llmc venv instead"
    "$VPY" -m pip install -q torchao "$TORCH_PIN"
    touch "$CACHE/torchao_in_llmc_venv"
    TORCHAO_WHERE="llmc-venv"
  else
    log "installing torchao into the system env (torch unchanged)"
    "$SYS_PY" -m pip install -q torchao
    "$SYS_PY" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
    TORCHAO_WHERE="system"
  fi
fi

# ---- record versions -----------------------------------------------------------------------
{
  echo "# written by benchmarks/setup_peers.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "[llmc venv: $LLMC_VENV]"
  "$VPY" - <<'PY'
import importlib.metadata as md
for p in ["llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate", "datasets", "torchao"]:
    try:
        print(f"{p}=={md.version(p)}")
    except md.PackageNotFoundError:
        pass
PY
  echo "[system env]"
  "$SYS_PY" - <<'PY'
import importlib.metadata as md
for p in ["torch", "transformers", "torchao", "gguf", "accelerate"]:
    try:
        print(f"{p}=={md.version(p)}")
    except md.PackageNotFoundError:
        pass
PY
  echo "torchao installed in: $TORCHAO_WHERE"
} > "$CACHE/peer_versions.txt"
cat "$CACHE/peer_versions.txt"
