"""``rlft export MODEL --to merged|gguf|onnx --out PATH``: ship a trained model.

Any model string works (alias, hub id, folder, adapter folder, ``.ckpt``, ``.gguf``); LoRA is merged into the base
first and the tokenizer and chat template travel along.

  merged  a plain Hugging Face folder (safetensors) that transformers loads without peft or rlft
  gguf    one .gguf file for llama.cpp (Llama, Mistral, Qwen2, Qwen3, Gemma); --quant f16 (default), q8_0, ...
  onnx    a folder with model.onnx (a decoder with KV-cache inputs/outputs) and the tokenizer, for onnxruntime
"""

from __future__ import annotations

import logging
from typing import Literal

from jsonargparse import ArgumentParser


def build_parser() -> ArgumentParser:
    from rlft.export.gguf import QUANT_TYPES

    parser = ArgumentParser(prog="rlft export", description=__doc__, default_config_files=[])
    parser.add_argument("model", help="hub id, local folder, adapter folder, .gguf, .ckpt or alias")
    parser.add_argument("--to", type=Literal["merged", "gguf", "onnx"], required=True, help="output format")
    parser.add_argument("--out", type=str, required=True, help="folder (merged, onnx) or .gguf file (gguf)")
    parser.add_argument("--quant", type=Literal[tuple(QUANT_TYPES)], default="f16",
                        help="GGUF tensor type (2-D weights; norms stay f32)")  # fmt: skip
    parser.add_argument("--dtype", type=Literal["float32", "bfloat16", "float16"], default="float32",
                        help="weights dtype of merged and onnx exports")  # fmt: skip
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    from rlft.export import export_gguf, export_merged, export_onnx

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.to == "gguf":
        path = export_gguf(args.model, args.out, quant=args.quant)
    elif args.quant != "f16":
        raise SystemExit(f"rlft export: --quant is for --to gguf; use --dtype for --to {args.to}")
    elif args.to == "merged":
        path = export_merged(args.model, args.out, dtype=args.dtype)
    else:
        path = export_onnx(args.model, args.out, dtype=args.dtype)
    print(f"rlft export: {args.model} -> {path} ({args.to})")
