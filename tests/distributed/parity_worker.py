"""Trains each requested method for a few steps under one strategy and saves what the parity tests compare.

Run as one process (the reference) or under ``torchrun --nproc_per_node 2`` (the sharded run); every method
shares one process group, so the 2-process start-up is paid once per strategy, not once per method::

    python tests/distributed/parity_worker.py OUT_DIR --strategy single --methods sft dpo ...
    torchrun --nproc_per_node 2 tests/distributed/parity_worker.py OUT_DIR --strategy zero3 --methods sft ...

For each method, rank 0 writes ``OUT_DIR/<method>.pt``: the global (all-rank mean) loss of every step and the full
trainable weights after the last step, gathered from the shards. ``--make-assets DIR`` writes what two methods start
from (an SFT adapter folder whose ``lora_B`` is not zero, so its frozen ``ref`` copy differs from the base, and a
reward-model folder); ``--assets DIR`` points the runs at them.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
from pathlib import Path

import lightning as L
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 4

# method -> (config, overrides of init_args): greedy rollouts make RL samples independent of the RNG stream,
# which differs between one process and two; lr is low enough that fp32 reduction order stays at rounding level
METHODS = {
    "sft": ("sft", {}),
    "sft_packed": ("sft", {}),  # padding-free batches: the packing probe runs on the sharded network first
    # tied input/output embeddings (Gemma): under FSDP2 rank 1 builds on meta and the tie must survive receiving
    "sft_tied": ("sft", {"model": "tiny-gemma"}),
    "rm": ("rm", {}),
    "dpo": ("dpo", {"reference": "adapter"}),
    "dpo_full_ref": ("dpo", {"reference": "model"}),
    "dpo_precomputed": ("dpo", {"reference": "precomputed"}),
    "orpo": ("orpo", {}),
    "simpo": ("simpo", {}),
    "ppo": ("ppo", {"sampling": {"max_new_tokens": 8, "temperature": 0.0}, "minibatch_size": None}),
    "ppo_critic": (
        "ppo",
        {"sampling": {"max_new_tokens": 8, "temperature": 0.0}, "minibatch_size": None, "critic": "tiny-llama"},
    ),
    "grpo": ("grpo", {"sampling": {"max_new_tokens": 8, "temperature": 1.0}, "group_size": 2}),
    # completions that stop at different lengths (the greedy continuations of the first prompts stop on this token at
    # different positions): each rank holds a different number of response tokens, so PPO's token mean must be global
    "ppo_ragged": (
        "ppo",
        {"sampling": {"max_new_tokens": 8, "temperature": 0.0, "stop_token_ids": [227]}, "minibatch_size": None},
    ),
    # DPO from an SFT adapter folder: the reference is that adapter, loaded again as the frozen `ref` adapter
    "dpo_sft_ref": ("dpo", {"model": "{assets}/sft", "reference": "adapter"}),
    # PPO scored by a reward model (each rank scores its own rollouts with its own replica)
    "ppo_rm": (
        "ppo",
        {
            "sampling": {"max_new_tokens": 8, "temperature": 0.0},
            "minibatch_size": None,
            "rewards": [{"source": "reward_model", "options": {"path": "{assets}/rm"}}],
        },
    ),
}


def make_assets(folder: Path) -> None:
    """An SFT adapter of tiny-llama with non-zero ``lora_B`` and an untrained reward model with a random head."""
    from rlft.methods import RewardModel
    from rlft.models import LoraSettings, load_model, load_tokenizer

    torch.manual_seed(0)
    sft = load_model("tiny-llama", lora=LoraSettings(r=8, alpha=16, dropout=0.0))
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    sft.save_pretrained(folder / "sft")
    load_tokenizer("tiny-llama").save_pretrained(folder / "sft")
    rm = RewardModel(model="tiny-llama", lora=None)
    with torch.no_grad():  # its head starts at zero (every reward 0); a random one makes rewards differ
        rm.model.head.weight.normal_(0.0, 1.0)
    rm.export(folder / "rm")


def _with_assets(value, assets: str):
    if isinstance(value, str):
        return value.replace("{assets}", assets)
    if isinstance(value, dict):
        return {k: _with_assets(v, assets) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_assets(v, assets) for v in value]
    return value


class RaggedGenerationProbe(L.Callback):
    """Each rank decodes a different number of tokens inside ``full_weights``, then all ranks meet in a collective.

    If decoding ran any collective per step (ZeRO-3's per-layer all-gathers, FSDP's unshards), the rank that stops
    first would leave the other waiting, and this would hang until the test's timeout.
    """

    def __init__(self) -> None:
        self.lengths: list[int] = []

    def on_train_start(self, trainer, module) -> None:
        from rlft.strategies import full_weights

        rank = trainer.global_rank
        prompt = module.tokenizer("Hello there", return_tensors="pt")
        network = getattr(module.model, "backbone", module.model)  # a reward model's causal LM
        with full_weights(module), torch.no_grad():
            new = 2 + 14 * rank
            out = network.generate(**prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        done = torch.tensor([out.shape[1] - prompt["input_ids"].shape[1]], dtype=torch.float32)
        if torch.distributed.is_initialized():
            gathered = [torch.zeros_like(done) for _ in range(trainer.world_size)]
            torch.distributed.all_gather(gathered, done)
            self.lengths = [int(t) for t in gathered]
        else:
            self.lengths = [int(done)]


def record_load(module) -> dict:
    """Elements of the frozen base a rank holds right after the network is built, and their full count (a ZeRO-3
    parameter keeps its partition in ``ds_tensor`` and an empty ``data``; a meta tensor holds nothing)."""
    held: dict = {}
    built = module.on_model_built

    def probe() -> None:
        # the base only: a reward model's small head is built whole on every rank (its bias frozen at 0)
        frozen = [p for n, p in module.model.named_parameters() if not p.requires_grad and not n.startswith("head.")]
        held["held"] = sum(
            p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0 if p.is_meta else p.numel() for p in frozen
        )
        held["full"] = sum(getattr(p, "ds_numel", p.numel()) for p in frozen)
        built()

    module.on_model_built = probe
    return held


class LossRecorder(L.Callback):
    """The loss of each optimisation step averaged over ranks (each rank logs only its own batch)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("train/global_loss", trainer.callback_metrics.get("train/loss"))
        loss = loss.detach().float().clone().reshape(1)
        if torch.distributed.is_initialized() and "train/global_loss" not in trainer.callback_metrics:
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
        self.losses.append(float(loss))


def strategy_for(name: str):
    from rlft.strategies import DeepSpeedStrategy, FSDP2Strategy

    return {
        "single": lambda: "auto",
        "ddp": lambda: "ddp",
        "zero2": lambda: DeepSpeedStrategy(stage=2),
        # threshold 0: every parameter of the tiny model is sharded (DeepSpeed keeps small ones whole by default)
        "zero3": lambda: DeepSpeedStrategy(stage=3, param_persistence_threshold=0),
        "fsdp": lambda: FSDP2Strategy(),
    }[name]()


def build(method: str, out: Path, assets: Path | None = None):
    config_name, overrides = METHODS[method]
    if "{assets}" in str(overrides):
        assert assets is not None, f"{method} needs --assets (made by --make-assets)"
        overrides = _with_assets(overrides, str(assets))
    config = yaml.safe_load((REPO / "configs" / config_name / "tiny.yaml").read_text())
    model_cfg, data_cfg = config["model"], config["data"]
    init = {**copy.deepcopy(model_cfg["init_args"]), **overrides, "output_dir": str(out / method / "hf_model")}
    # Adam divides by sqrt(v) + eps: for a weight whose true gradient is 0 (the reward head's bias cancels in
    # r_c - r_r) it turns rounding-level gradients (~1e-9, which differ with the reduction order) into lr-sized
    # steps. eps 1e-6 bounds that amplification so the comparison measures the training, not Adam's noise
    init["optim"] = {**init.get("optim", {}), "eps": 1e-6}
    if isinstance(init.get("sampling"), dict) and "sampling" in model_cfg["init_args"]:
        init["sampling"] = {**model_cfg["init_args"]["sampling"], **overrides.get("sampling", {})}
    module_path, _, cls_name = model_cfg["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_path), cls_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data_args = {**data_cfg["init_args"], "batch_size": GLOBAL_BATCH // world, "val_fraction": 0.0}
    data_args["packing"] = method.endswith("_packed")
    data_args["path"] = str(REPO / data_args["path"])
    from rlft.data import PreferenceDataModule

    return cls(**init), PreferenceDataModule(**data_args)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--strategy", default="single")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--assets", type=Path)
    parser.add_argument("--make-assets", action="store_true", help="write the assets into OUT_DIR and stop")
    args = parser.parse_args()
    if args.make_assets:
        make_assets(args.out)
        return
    from rlft.strategies import full_state_dict

    world = int(os.environ.get("WORLD_SIZE", "1"))
    for method in args.methods:
        L.seed_everything(0, verbose=False)
        module, data = build(method, args.out, args.assets)
        load = record_load(module)
        recorder, probe = LossRecorder(), RaggedGenerationProbe()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=world,
            strategy=strategy_for(args.strategy),
            max_steps=args.steps,
            precision="32-true",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[recorder, probe],
            default_root_dir=str(args.out / method),
        )
        trainer.fit(module, datamodule=data)
        weights = full_state_dict(module, trainable_only=True)
        network = module.model.get_base_model() if hasattr(module.model, "get_base_model") else module.model
        tied = getattr(network, "get_output_embeddings", lambda: None)()
        tied = tied is not None and tied.weight is network.get_input_embeddings().weight
        loads, ties = [load], [tied]
        if torch.distributed.is_initialized():
            loads, ties = [None] * world, [None] * world
            torch.distributed.all_gather_object(loads, load)
            torch.distributed.all_gather_object(ties, tied)
        if trainer.is_global_zero:
            result = {
                "losses": recorder.losses,
                "weights": weights,
                "generated": probe.lengths,
                "load": loads,
                "tied": ties,
            }
            torch.save(result, args.out / f"{method}.pt")
        print(f"parity_worker: {method} {args.strategy} losses {recorder.losses}", file=sys.stderr, flush=True)
    # leave without interpreter finalization: gloo's worker threads drop their finished collectives (and the tensors
    # those hold) just after the collective returns, and one still doing so while Python finalizes cannot take the
    # GIL and aborts the process ("terminate called without an active exception": 3 of 20 runs here, once in CI)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
