"""Reward model: a causal-LM backbone plus a scalar head, trained with the Bradley-Terry pairwise loss.

The network, its exported folder (backbone, tokenizer, ``reward_head.safetensors``, ``reward_config.json``) and the
scorer that RL and evaluation use live in :mod:`rlft.models.reward`; this module is only the training recipe.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

from rlft.data.batches import PairBatch, RankingBatch
from rlft.losses import bradley_terry_loss
from rlft.methods.base import RLFTModule
from rlft.metrics import pairwise_auroc
from rlft.models.model_card import write_model_card
from rlft.models.reward import (
    REWARD_HEADS,
    HeadNotRepresentable,
    RewardNetwork,
    write_reward_folder,
    write_sequence_classification_folder,
)
from rlft.models.scoring import pair_layout
from rlft.models.unwrap import causal_lm
from rlft.outputs import LossOutput
from rlft.ranking_losses import RANKING_LOSSES
from rlft.registry import resolve

log = logging.getLogger(__name__)


class RewardModel(RLFTModule):
    """Pairwise reward model (InstructGPT, https://arxiv.org/abs/2203.02155) with a Bradley-Terry loss.

    Logs ``train/loss``, ``{train,val}/rewards/{chosen,rejected,margin}``, ``train/accuracy``, and over the whole
    validation set ``val/loss``, ``val/accuracy`` (share of pairs ranked right) and ``val/auroc`` (chosen vs
    rejected rewards pooled), all from :meth:`compute_loss`.

    Per-row fields of pair data: a ``margin`` (a number on every pair) is Llama 2's preference-strength margin
    ``m_i`` in ``-log sigmoid(r_c - r_r - m_i)`` and takes precedence over the constant ``margin`` below; a
    ``weight`` weights each pair's loss in the batch mean. To change the pair loss, override :meth:`reward_loss`.

    Args:
        head: ``linear`` or ``mlp`` (2 layers) — see ``REWARD_HEADS``.
        margin: Constant margin ``m`` in ``-log sigmoid(r_c - r_r - m)`` for data without a per-row ``margin`` (a
            per-row margin wins where both are given); null for none.
        center_coef: Weight of ``(r_c + r_r)^2`` that keeps rewards centred on 0 (0 disables it).
        head_dtype: Keep the head in this dtype (``float32`` is stable even with a bf16 backbone).
        share_prompts: Run each pair's common prompt once for both responses (exact; see ``rlft.methods.DPO``).
        ranking_loss: Loss for K-wise ranking batches (from ``rlft.data.RankingDataModule``): a key of
            ``rlft.ranking_losses.RANKING_LOSSES`` (``plackett_luce`` or ``kwise_bradley_terry``). Pair batches always
            use Bradley-Terry.
    """

    default_lr = 1e-4
    data_kind = "pairs"
    uses_fields = frozenset({"margin", "weight"})

    def __init__(
        self,
        model: str,
        head: str = "linear",
        margin: float | None = None,
        center_coef: float = 0.0,
        head_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        share_prompts: bool = True,
        ranking_loss: str = "plackett_luce",
        **kwargs,
    ) -> None:
        resolve(ranking_loss, RANKING_LOSSES, "ranking_loss")  # a typo fails here, not at the first step
        resolve(head, REWARD_HEADS, "reward head")
        super().__init__(model, **kwargs)

    def build_model(self) -> RewardNetwork:
        backbone = super().build_model()
        lm = causal_lm(backbone)
        hidden = lm.config.get_text_config().hidden_size
        head = resolve(self.hparams.head, REWARD_HEADS, "reward head")(hidden).to(
            getattr(torch, self.hparams.head_dtype)
        )
        # pairwise and ranking losses compare rewards, so the output's constant offset gets a zero gradient: trained,
        # its float rounding (~1e-9) becomes full lr-sized Adam steps, a bias that random-walks on noise. It stays at
        # 0 (as transformers' bias-free `score`) unless center_coef ties the rewards' mean down
        output = list(head.modules())[-1]
        if not self.hparams.center_coef and isinstance(getattr(output, "bias", None), torch.nn.Parameter):
            output.bias.requires_grad_(False)
        return RewardNetwork(backbone, head)

    # ------------------------------------------------------------------------------------------ loss
    def pair_rewards(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of chosen and rejected (``[B]`` each) from one forward over both."""
        layout = pair_layout(self.model.backbone, batch, self.hparams.share_prompts)
        rewards = self.model.score_at(layout.inputs, layout.last)
        n = len(rewards) // 2
        return rewards[:n], rewards[n:]

    def ranking_rewards(self, batch: RankingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, K]`` rewards (best first) and their mask for a ranking batch: all responses in one forward."""
        flat = self.model(batch.tokens.input_ids, batch.tokens.attention_mask)
        sizes = batch.sizes.tolist()
        mask = torch.arange(max(sizes), device=flat.device)[None] < batch.sizes.to(flat.device)[:, None]
        rewards = flat.new_zeros(mask.shape).masked_scatter(mask, flat)
        return rewards, mask

    def ranking_pairs(self, batch: RankingBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-prompt ranking losses and every (better, worse) pair's rewards of a ranking batch."""
        rewards, mask = self.ranking_rewards(batch)
        losses = resolve(self.hparams.ranking_loss, RANKING_LOSSES, "ranking_loss")(rewards, mask)
        k = rewards.shape[1]
        upper = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(1)
        pairs = (upper & mask[:, :, None] & mask[:, None, :]).nonzero()
        return losses, rewards[pairs[:, 0], pairs[:, 1]], rewards[pairs[:, 0], pairs[:, 2]]

    def reward_loss(self, chosen: torch.Tensor, rejected: torch.Tensor, batch: PairBatch) -> LossOutput:
        """Per-pair losses ``[B]`` from the rewards (with grad) of chosen and rejected, ``[B]`` each.

        Bradley-Terry with the batch's per-row ``margin`` if it has one, else the constant ``margin``. ``batch``
        carries every per-row field of the data, for a variant that reads one; the per-row ``weight`` is applied
        after this hook, by :meth:`compute_loss`. Override to change the loss of training and validation alike.
        """
        margin = batch.field("margin")
        margin = self.hparams.margin if margin is None else margin.to(chosen)
        return bradley_terry_loss(chosen, rejected, margin=margin, center_coef=self.hparams.center_coef)

    def compute_loss(self, batch: PairBatch | RankingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The (``weight``-ed) mean loss of a pair or ranking batch; its metrics carry every pair's rewards, ``[B]``,
        from which validation computes accuracy and AUROC over the whole set."""
        if isinstance(
            batch, RankingBatch
        ):  # per-prompt losses; every (better, worse) pair of a ranking counts as a pair
            losses, chosen, rejected = self.ranking_pairs(batch)
            output = LossOutput(losses)
        else:
            chosen, rejected = self.pair_rewards(batch)
            output = self.reward_loss(chosen, rejected, batch)
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {k: v for k, v in output.stats.items() if k not in ("chosen_rewards", "rejected_rewards")}
        metrics.update(
            {
                "accuracy": (chosen > rejected).float().mean(),
                "rewards/chosen": chosen,
                "rewards/rejected": rejected,
                "rewards/margin": (chosen - rejected).mean(),
            }
        )
        return self.reduce_losses(output.losses, batch), metrics

    def validation_epoch_metrics(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accuracy, AUROC and reward means over every pair of the set; ``loss``: the batches' losses weighted by
        their numbers of examples."""
        chosen, rejected, sizes = pooled["rewards/chosen"], pooled["rewards/rejected"], pooled["batch_size"]
        return {
            "loss": (pooled["loss"] * sizes).sum() / sizes.sum(),
            "accuracy": (chosen > rejected).double().mean(),
            "auroc": torch.tensor(pairwise_auroc(chosen.tolist(), rejected.tolist())),
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margin": (chosen - rejected).mean(),
        }

    # ------------------------------------------------------------------------------------------ export
    def reward_config(self) -> dict:
        hp = self.hparams
        return {
            "head": hp.head,
            "head_dtype": hp.head_dtype,
            "dtype": hp.dtype,
            "trained_from": hp.model,
            "backbone": "adapter" if hasattr(self.model.backbone, "peft_config") else "full",
            "format": "rlft",
        }

    def export(self, path: str | Path, network: RewardNetwork | None = None) -> Path:
        """Write the reward folder, with a README.md model card.

        With a ``linear`` head (the default) the folder is an ``<Arch>ForSequenceClassification`` checkpoint (LoRA
        merged into the weights) whose ``score`` is the trained head, so transformers, TRL, OpenRLHF and vLLM load
        the rewards rlft trained; :meth:`RewardScorer.from_pretrained` loads it too. A head transformers cannot
        represent (``mlp``, or a bias the architecture has no norm bias to fold into) gets rlft's own folder
        (backbone, ``reward_head.safetensors``, ``reward_config.json``) and a card that says to load it with
        ``RewardScorer``: a sequence-classification folder would load it with a freshly initialised ``score``.
        """
        network = self.model if network is None else network
        path = Path(path)
        backbone = network.backbone
        if any(p.is_meta for p in backbone.parameters()):
            # a sharded run's adapter-only twin (base on the meta device): merging needs the real base weights
            full = self.build_model()
            full.load_state_dict({k: v for k, v in network.state_dict().items() if not v.is_meta}, strict=False)
            network, backbone = full, full.backbone
        notes = []
        try:
            config = {**self.reward_config(), "backbone": "merged" if hasattr(backbone, "peft_config") else "full"}
            write_sequence_classification_folder(path, backbone, network.head, self.tokenizer, config)
            usage = "sequence_classification"
            if self.tokenizer.pad_token_id == self.tokenizer.eos_token_id:
                notes.append(
                    f"the pad token (id {self.tokenizer.pad_token_id}) is also the end-of-sequence token: "
                    "transformers reads the reward at the rightmost token that is not the pad token, so a "
                    "sequence that ends with it is read one token early; rlft's RewardScorer reads the "
                    "last token of the attention mask"
                )
        except HeadNotRepresentable as error:
            write_reward_folder(path, backbone, network.head, self.tokenizer, self.reward_config())
            usage = "rlft_reward"
            notes.append(
                f"{error}. This is rlft's reward folder: load it with `RewardScorer` (below). Loaded with "
                "`AutoModelForSequenceClassification` it would get a freshly initialised `score` and give "
                "unrelated rewards."
            )
            log.warning("reward head not exportable as sequence classification (%s); wrote rlft's folder", error)
        facts = self.model_card_facts(usage)
        facts.notes += notes
        write_model_card(path, facts)
        if self.hparams.merge_on_save and usage == "rlft_reward" and hasattr(backbone, "merge_and_unload"):
            import copy

            merged = copy.deepcopy(backbone).merge_and_unload()
            write_reward_folder(
                path / "merged", merged, network.head, self.tokenizer, {**self.reward_config(), "backbone": "full"}
            )
            write_model_card(path / "merged", facts)
        print(
            f"rlft: reward model saved to {path}"
            + (" (transformers sequence classification)" if usage == "sequence_classification" else "")
        )
        return path
