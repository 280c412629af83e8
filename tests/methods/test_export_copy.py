"""The copy a sharded run exports from: an adapter export never loads the frozen base again."""

from __future__ import annotations

import peft
import torch

from rlft.methods import SFT


def test_adapter_copy_is_built_on_meta_and_exports_the_trained_adapter(tmp_path):
    module = SFT(model="tiny-llama")
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.01)
    trained = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    twin = module.unsharded_copy(trained)
    frozen = [p for p in twin.parameters() if not p.requires_grad]
    assert frozen and all(p.is_meta for p in frozen), "the frozen base was loaded for an adapter export"
    module.export(tmp_path, twin)
    base = module.build_model().get_base_model()
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path)
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, trained[name], msg=name)


def test_merged_export_loads_the_base_in_full():
    module = SFT(model="tiny-llama", merge_on_save=True)
    trained = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    twin = module.unsharded_copy(trained)
    assert not any(t.is_meta for t in twin.state_dict().values())
