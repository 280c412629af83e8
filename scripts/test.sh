#!/usr/bin/env bash
# Fresh machine -> lint + the whole test suite. Sets up .venv first (see scripts/setup_env.sh).
#   bash scripts/test.sh                 # everything (real-model tests pull SmolLM2 once, ~40 s)
#   bash scripts/test.sh -m "not real"   # skip the real-model tests; any pytest arguments work
set -euo pipefail
cd "$(dirname "$0")/.."
# export: llama-cpp-python is built from source the first time (cmake; the wheel is cached in ~/.cache/pip)
bash scripts/setup_env.sh dev,docs,eval,ui,deepspeed,wandb,tune,export
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
echo "rlft: ruff"
.venv/bin/ruff check rlft tests scripts
.venv/bin/ruff format --check rlft tests scripts
echo "rlft: docs (mkdocs build --strict)"
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict -d "$(mktemp -d)"  # not -q: it hides the warnings --strict counts
echo "rlft: pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
