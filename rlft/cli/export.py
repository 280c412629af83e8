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
    parser.add_argument(
        "--quant",
        type=Literal[tuple(QUANT_TYPES)],
        default="f16",
        help="GGUF tensor type (2-D weights; norms stay f32)",
    )
    parser.add_argument(
        "--dtype",
        type=Literal["float32", "bfloat16", "float16"],
        default="float32",
        help="weights dtype of merged and onnx exports",
    )
    parser.add_argument(
        "--push_to_hub",
        type=str | None,
        default=None,
        help="also upload the result to hub repo owner/name (HF_HUB_OFFLINE=0, logged in)",
    )
    parser.add_argument("--private", type=bool, default=False, help="create the --push_to_hub repo as private")
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    from rlft.export import export_gguf, export_merged, export_onnx

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.push_to_hub:  # before the export: an offline push fails in a second, not after minutes of converting
        from rlft.export.hub import HubOffline, check_can_push

        try:
            check_can_push(args.push_to_hub)
        except (HubOffline, ValueError) as error:
            raise SystemExit(f"rlft export: {error}") from None
    if args.to == "gguf":
        path = export_gguf(args.model, args.out, quant=args.quant)
    elif args.quant != "f16":
        raise ValueError(f"--quant is for --to gguf; use --dtype for --to {args.to}")
    elif args.to == "merged":
        path = export_merged(args.model, args.out, dtype=args.dtype)
    else:
        path = export_onnx(args.model, args.out, dtype=args.dtype)
    print(f"rlft export: {args.model} -> {path} ({args.to})")
    if args.push_to_hub:
        from rlft.export.hub import push_to_hub

        print(f"rlft export: pushed to {push_to_hub(path, args.push_to_hub, private=args.private)}")
