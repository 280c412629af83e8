"""Export a trained model for deployment: a merged Hugging Face folder, GGUF (llama.cpp) or ONNX (onnxruntime).

Every exporter takes any rlft model string (alias, hub id, folder, adapter folder, ``.ckpt``, ``.gguf``), merges
LoRA into the base first and carries the tokenizer and chat template along.
"""

from rlft.export.gguf import QUANT_TYPES, export_gguf
from rlft.export.merged import export_merged, merged_model
from rlft.export.onnx import OnnxCausalLM, export_onnx

FORMATS = {"merged": export_merged, "gguf": export_gguf, "onnx": export_onnx}

__all__ = ["FORMATS", "QUANT_TYPES", "OnnxCausalLM", "export_gguf", "export_merged", "export_onnx", "merged_model"]
