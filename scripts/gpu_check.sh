#!/usr/bin/env bash
# One prepared GPU check (fits in ~8 minutes on one H100/H200): installs what it needs, then writes
# $OUT/gpu_report.json and $OUT/gpu_report.md (OUT defaults to ./gpu_report).
#   bash scripts/gpu_check.sh              # on a GPU machine
#   bash scripts/gpu_check.sh --dry-run    # anywhere: the CPU-safe parts on tiny models (what the tests run)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu_report}"
if [[ "${1:-}" != "--dry-run" ]]; then
  bash scripts/setup_env.sh dev,deepspeed,qlora
  # flash-attn only where a prebuilt wheel exists (a source build takes far longer than this check)
  .venv/bin/python -m pip install -q --only-binary=:all: flash-attn 2>/dev/null || echo "gpu_check: no flash-attn wheel"
fi
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" "$python" scripts/gpu_check.py --out "$out" "$@"
