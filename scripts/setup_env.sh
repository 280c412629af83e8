#!/usr/bin/env bash
# Create or refresh the project's virtualenv in .venv and install rlft into it with the given extras.
# Usage: bash scripts/setup_env.sh [EXTRAS]      e.g. bash scripts/setup_env.sh dev,eval,ui
# Torch: on a machine without an NVIDIA GPU a CPU build is preferred (an unpinned `torch` pulls GBs of CUDA
# wheels). Override the requirement with RLFT_TORCH_SPEC (and pip's usual PIP_INDEX_URL/PIP_EXTRA_INDEX_URL).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "rlft: creating virtualenv .venv"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
# pip's output minus one harmless notice; a failed install stops the setup (piping pip into a filter would otherwise
# hide its exit status, and a missing extra would only show later as skipped tests)
install() {
  local log status=0
  log="$(mktemp)"
  "${pip[@]}" install "$@" >"$log" 2>&1 || status=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
  if [ "$status" != 0 ]; then
    echo "rlft: 'pip install $*' failed (exit $status, output above)" >&2
    exit "$status"
  fi
}
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    spec="${RLFT_TORCH_SPEC:-torch}"
  else
    spec="${RLFT_TORCH_SPEC:-torch==2.13.0}"
  fi
  echo "rlft: installing $spec"
  install "$spec"
fi
target="."
[ -n "$extras" ] && target=".[$extras]"
echo "rlft: installing rlft$( [ -n "$extras" ] && echo "[$extras]" ) (editable)"
install -e "$target"
if [[ ",$extras," == *",dev,"* ]] && [ ! -d .bench/trl-1.12/trl ]; then
  # scripts/bench/run.py --mode ppo runs TRL's PPO, which TRL removed in 1.13: the last release with it, beside the venv's TRL
  echo "rlft: installing TRL 1.12 (PPO) into .bench/trl-1.12 for scripts/bench/run.py --mode ppo"
  if ! "${pip[@]}" install --no-deps --target .bench/trl-1.12 trl==1.12.0 >.bench-install.log 2>&1; then
    tail -5 .bench-install.log
    echo "rlft: WARNING: TRL 1.12 did not install (above): scripts/bench/run.py --mode ppo and its tests will be skipped" >&2
  fi
  rm -f .bench-install.log
fi
.venv/bin/python -c "import rlft, torch; print(f'rlft {rlft.__version__} ready (torch {torch.__version__})')"
