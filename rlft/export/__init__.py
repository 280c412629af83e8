"""Export a trained model for deployment: a merged Hugging Face folder, GGUF (llama.cpp) or ONNX (onnxruntime).

Every exporter takes any rlft model string (alias, hub id, folder, adapter folder, ``.ckpt``, ``.gguf``), merges
LoRA into the base first and carries the tokenizer and chat template along; a reward model exports as
``<Arch>ForSequenceClassification`` with its trained head. Every exported folder gets a README.md model card, and
``push_to_hub`` uploads one.
"""

from rlft.export.gguf import QUANT_TYPES, export_gguf
from rlft.export.hub import push_to_hub
from rlft.export.merged import export_merged, export_reward_model, merged_model
from rlft.export.onnx import OnnxCausalLM, export_onnx

FORMATS = {"merged": export_merged, "gguf": export_gguf, "onnx": export_onnx}

__all__ = [
    "FORMATS",
    "QUANT_TYPES",
    "OnnxCausalLM",
    "export_gguf",
    "export_merged",
    "export_onnx",
    "export_reward_model",
    "merged_model",
    "push_to_hub",
]
