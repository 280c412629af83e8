"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for every rlft method, on GPUs and on CPU processes (gloo).

Lightning's ``FSDPStrategy`` wraps FSDP1, which needs an accelerator ("FSDP needs a non-CPU accelerator device").
FSDP2 — where PyTorch, TRL and torchtune have moved — shards plain tensors as DTensors on a device mesh and runs on
a gloo CPU mesh as well, so the same code path is proven on CPU processes in CI and used on GPUs. Lightning's entry
point for it is ``ModelParallelStrategy``; this subclass makes it pure data parallel (the whole world is one
``data_parallel`` mesh dimension) and applies the sharding itself, so methods need no parallelism code:

- each decoder layer is its own FSDP unit (the layer classes come from the model's ``_no_split_modules``, the
  list transformers keeps for exactly this), then the decoder stack of every network (policy, critic, separate
  reference, reward backbone); the output head stays whole on every rank (see ``shard_module``);
- loading: only rank 0 reads the checkpoint; the other ranks build each network from its config on the meta
  device and receive each unit (decoder layer, then the rest, then replicated heads and buffers) from rank 0 right
  before it is sharded, so no rank but rank 0 ever holds the whole model (``model_sharded_context``,
  ``shard_module``);
- LoRA needs nothing special: FSDP2 shards frozen and trainable parameters of a unit together;
- mixed precision: with ``bf16-mixed`` the parameters are all-gathered and computed in bf16 while gradients are
  reduced in fp32 (``MixedPrecisionPolicy``); fp32 otherwise.

Checkpoints are torch distributed checkpoints (a folder of shards) that ``--ckpt_path last`` resumes.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from rlft.models.loading import structure_only
from rlft.models.memory import return_freed_memory

log = logging.getLogger(__name__)


def decoder_layer_classes(network: torch.nn.Module) -> tuple[type, ...]:
    """The classes a transformers model says must not be split (its decoder layers)."""
    names = set()
    for sub in network.modules():
        names.update(getattr(sub, "_no_split_modules", None) or [])
    return tuple({type(m) for m in network.modules() if type(m).__name__ in names})


def network_roots(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost transformers models inside a LightningModule (policy, critic, reference, reward backbone)."""
    from transformers import PreTrainedModel

    roots, inside = [], set()
    for sub in module.modules():
        if id(sub) in inside:
            continue
        if isinstance(sub, PreTrainedModel):
            roots.append(sub)
            inside.update(id(m) for m in sub.modules())
    return roots


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over all processes; CPU (gloo) and GPU (NCCL) alike.

    Args:
        reshard_after_forward: Free each layer's gathered weights after its forward (ZeRO-3-like; ``False`` keeps
            them until backward: faster, more memory, ZeRO-2-like).
        param_dtype: Dtype weights are gathered and computed in; ``None`` follows the trainer's precision
            (``bf16-mixed`` -> bfloat16, else float32).
        save_distributed_checkpoint: Checkpoints as a folder of shards (``True``) or one full file on rank 0.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = param_dtype

    def setup_environment(self) -> None:
        precision = str(getattr(self.precision_plugin, "precision", "32-true"))
        if self.root_device.type == "cpu" and precision.startswith("16"):
            raise ValueError(
                f"precision {precision!r} on CPU cannot work (fp16 needs CUDA kernels and loss scaling); use "
                "--trainer.precision 32-true or bf16-mixed on CPU, or run on GPUs"
            )
        # every process is a data-parallel replica: one mesh dimension over the whole world
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @contextlib.contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        # Lightning runs configure_model (where methods build their networks) inside this
        with structure_only(self.world_size > 1 and self.global_rank != 0):
            yield

    def _mixed_precision(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        precision = str(getattr(self.precision_plugin, "precision", "32-true"))
        name = self.param_dtype or ("bfloat16" if precision.startswith("bf16") else "float32")
        if name == "float32":
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=getattr(torch, name), reduce_dtype=torch.float32)

    def shard_module(self, module: torch.nn.Module) -> None:
        """Apply FSDP2 to every network of a LightningModule (called from its ``configure_model``)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = self.device_mesh["data_parallel"]
        policy = self._mixed_precision()
        roots = network_roots(module)
        if any(isinstance(root.get_decoder() if hasattr(root, "get_decoder") else root, FSDPModule) for root in roots):
            return  # configure_model runs again for validate/test after fit
        received: dict[int, tuple] = {}
        for root in roots:
            decoder = root.get_decoder() if hasattr(root, "get_decoder") else root
            layers = decoder_layer_classes(root)
            if not layers:
                log.warning(
                    "%s declares no decoder layers (_no_split_modules); sharding it as one unit", type(root).__name__
                )
            for sub in decoder.modules():
                if isinstance(sub, layers):
                    self._receive_from_rank0(sub, received)
                    fully_shard(sub, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
            # rlft scores from hidden states: it calls the decoder stack, then reads the output head's weight in
            # chunks (never the [B, T, V] logits). So the decoder stack is the outer unit, and the head — tied to
            # the input embeddings or not — stays whole on every rank: a vocabulary x hidden matrix
            head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
            self._receive_from_rank0(decoder, received)
            if head is not None:  # after the decoder, so that a head tied to the input embeddings stays tied
                self._receive_from_rank0(head, received)
            ignored = set(head.parameters()) if head is not None else set()
            fully_shard(decoder, mesh=mesh, mp_policy=policy, reshard_after_forward=False, ignored_params=ignored)
        self._receive_from_rank0(module, received)  # output heads, value and reward heads: replicated
        return_freed_memory()  # the full units each rank held until it sharded them
        # heads outside any transformers model (a reward head) stay replicated; their gradients are averaged
        for param in module.parameters():
            if param.requires_grad and not hasattr(param, "device_mesh"):
                param.register_hook(self._average_replicated_gradient)

    def _receive_from_rank0(self, module: torch.nn.Module, received: dict[int, tuple]) -> None:
        """Make every not yet sharded tensor of ``module`` a real copy of rank 0's, in place in the module tree.

        Called for each unit right before ``fully_shard``, so a rank that built on the meta device holds at most one
        unit in full, and rank 0's originals are freed unit by unit as they are sharded. A tensor seen twice (tied
        input and output embeddings, a unit's tensors seen again from its parent) is sent once and stays shared:
        ``received`` maps it, weakly, to its replacement. Rank 0 sends even where every rank loaded for itself, so
        randomly initialised heads are identical everywhere.
        """
        if self.world_size == 1:
            return
        device = self.root_device
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, tensor in list(table.items()):
                    if tensor is None or hasattr(tensor, "device_mesh"):  # absent, or sharded already
                        continue
                    old, new = received.get(id(tensor), (lambda: None, lambda: None))
                    if old() is tensor and new() is not None:
                        table[name] = new()
                        continue
                    new = tensor
                    if tensor.is_meta or tensor.device != device:
                        data = torch.empty_like(tensor, device=device) if tensor.is_meta else tensor.to(device)
                        is_param = isinstance(tensor, torch.nn.Parameter)
                        new = torch.nn.Parameter(data, requires_grad=tensor.requires_grad) if is_param else data
                    torch.distributed.broadcast(new.data, src=0)
                    table[name] = new
                    # weak, so rank 0's originals are freed as soon as fully_shard replaces them
                    received[id(tensor)] = (weakref.ref(tensor), weakref.ref(new))
                    received[id(new)] = (weakref.ref(new), weakref.ref(new))

    def _average_replicated_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)  # gloo has no AVG
        return grad / torch.distributed.get_world_size()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Resume a folder of shards that holds the trained tensors only.

        rlft checkpoints drop the frozen base (it is reloaded from the model string), and Lightning's loader asks
        the checkpoint for every tensor of the module; this asks only for what was saved.
        """
        from pathlib import Path

        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            return super().load_checkpoint(checkpoint_path, weights_only)
        saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()
        module = self.model
        state = {k: v for k, v in get_model_state_dict(module).items() if f"state_dict.{k}" in saved}
        if not state:
            raise ValueError(f"{path}: no tensor of this model in the checkpoint (a checkpoint of another run?)")
        load({"state_dict": state}, checkpoint_id=path)
        module.load_state_dict(state, strict=False)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
            load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(
                module, optimizer, optimizer_state[key], options=StateDictOptions(cpu_offload=True)
            )
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        # the precision plugin clips with torch's clip_grad_norm_, which cannot mix sharded (DTensor) gradients
        # with the plain ones of replicated heads; this computes the global norm over both
        self.precision_plugin.clip_grad_by_norm = lambda optimizer, clip_val: clip_grad_norm(
            list(self.precision_plugin.main_params(optimizer)), float(clip_val)
        )


def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip gradients to a global L2 norm across sharded (DTensor) and replicated parameters; returns the norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    plain = [g for g in grads if not hasattr(g, "full_tensor")]
    squares = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    if sharded:
        squares = squares + torch.nn.utils.get_total_norm(sharded).full_tensor().float() ** 2
    if plain:  # replicated: every rank holds the same averaged gradient, so the local norm is the global one
        squares = squares + torch.nn.utils.get_total_norm(plain).float() ** 2
    total = squares.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype) if not hasattr(g, "full_tensor") else scale.item())
    return total
