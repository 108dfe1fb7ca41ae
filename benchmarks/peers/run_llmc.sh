#!/usr/bin/env bash
# Run llm-compressor peer schemes ONE AT A TIME (the machine is shared), each with its own log
# and JSON under benchmarks/.cache/llmc/. Skips a scheme whose JSON already says ok=true unless
# FORCE=1. Extra llmc_run.py flags can be given after "--".
#
#   benchmarks/peers/run_llmc.sh none rtn-w4-g64 rtn-w4-g128
#   benchmarks/peers/run_llmc.sh gptq-w4-g64 -- --threads 2
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VPY="${LLMC_VENV:-$ROOT/.venv-llmc}/bin/python"
MODEL="${MODEL:-$ROOT/benchmarks/.cache/smollm2-135m-fp32}"
CALIB="${CALIB:-$ROOT/benchmarks/.cache/calib_smollm2_128x512.pt}"
OUTROOT="${OUTROOT:-$ROOT/benchmarks/.cache/llmc}"
schemes=(); extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  schemes+=("$1"); shift
done
mkdir -p "$OUTROOT/logs"
for s in "${schemes[@]}"; do
  js="$OUTROOT/$s.json"
  if [ "${FORCE:-0}" != 1 ] && [ -f "$js" ] && grep -q '"ok": true' "$js"; then
    echo "[run_llmc] $s: already done ($js)"; continue
  fi
  echo "[run_llmc] $s -> $js (log $OUTROOT/logs/$s.log)"
  "$VPY" "$ROOT/benchmarks/peers/llmc_run.py" --model "$MODEL" --scheme "$s" --calib "$CALIB" \
    --out "$OUTROOT/$s" --json "$js" "${extra[@]}" > "$OUTROOT/logs/$s.log" 2>&1
  "$VPY" -c "import json,sys; d=json.load(open(sys.argv[1])); print('[run_llmc]', d['scheme'], 'ok=%s ppl_quick=%s wall_s=%s peak_rss_mb=%s disk_bytes=%s error=%s' % (d['ok'], d['ppl_quick'], d['wall_s'], d['peak_rss_mb'], d['disk_bytes'], d['error']))" "$js"
done
