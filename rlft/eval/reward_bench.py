"""RewardBench-lite: how well a reward model ranks held-out pairs, and what it says about a policy's outputs.

Everything scores through one protocol, :class:`rlft.models.scorer.ExchangeScorer`
(``score_exchanges(prompts, responses) -> list[float]``): a trained rlft reward model
(:class:`rlft.models.reward.RewardScorer`), any ``AutoModelForSequenceClassification`` folder
(:class:`RewardModelScorer`) or a plain Python function over rendered texts (rules, a judge; wrap it in
:class:`TextFunctionScorer`). Scorers that read whole texts share the base :class:`TextScorer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from rlft.data.padding import pad
from rlft.eval.refusal import RubricRefusalClassifier
from rlft.metrics import pairwise_auroc
from rlft.models.modes import inference as eval_mode  # no grad, eval mode, restored after
from rlft.models.scorer import ExchangeScorer

Scorer = Callable[[list[str]], list[float]]
"""A function scoring whole texts (``texts -> scores``), e.g. a toxicity classifier."""


def plain_transcript(prompt: list[dict] | str, response: str) -> str:
    """A template-free rendering (``User: ...\\nAssistant: ...``) for scorers without a tokenizer."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in prompt]
    return "\n".join([*turns, f"Assistant: {response}"])


class TextScorer:
    """Base of the scorers that read one whole text per exchange: subclasses implement ``__call__(texts)``, and
    :meth:`render` (default :func:`plain_transcript`) turns an exchange into its text, so every one of them is an
    :class:`~rlft.models.scorer.ExchangeScorer`."""

    def __call__(self, texts: list[str]) -> list[float]:
        raise NotImplementedError

    def render(self, prompt: list[dict] | str, response: str) -> str:
        return plain_transcript(prompt, response)

    def score_exchanges(self, prompts: Sequence[list[dict] | str], responses: Sequence[str]) -> list[float]:
        return [float(x) for x in self([self.render(p, r) for p, r in zip(prompts, responses)])]


class TextFunctionScorer(TextScorer):
    """A plain ``texts -> scores`` function (rules, a judge) as a :class:`TextScorer` on plain transcripts."""

    def __init__(self, function: Scorer) -> None:
        self.function = function

    def __call__(self, texts: list[str]) -> list[float]:
        return list(self.function(texts))


class RewardModelScorer(TextScorer):
    """A sequence-classification reward model (one logit) as a :class:`TextScorer` on chat-template renderings.

    Texts are right-padded and the reward is read at the last real token via the model's own pooling, with the
    pad token id set on the config so padding on either side cannot move the read position.

    Args:
        model: ``AutoModelForSequenceClassification`` with ``num_labels == 1`` (or a PEFT wrapper of one).
        tokenizer: Its tokenizer (chat template used by :meth:`render`).
        batch_size: Texts per forward pass.
        max_length: Truncate longer texts (from the left, keeping the response).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int = 1024) -> None:
        num_labels = getattr(model.config, "num_labels", 1)
        if num_labels != 1:
            raise ValueError(f"a reward model has one output (num_labels=1), this one has {num_labels}")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length

    def render(self, prompt: list[dict] | str, response: str) -> str:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False
        )

    def __call__(self, texts: list[str]) -> list[float]:
        tok, scores = self.tokenizer, []
        device = next(self.model.parameters()).device
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with eval_mode(self.model):
            for start in range(0, len(texts), self.batch_size):
                chunk = texts[start : start + self.batch_size]
                # templates carry their own BOS; add none, and keep the end (the response) when truncating
                encoded = [tok(t, add_special_tokens=False)["input_ids"][-self.max_length :] for t in chunk]
                ids, mask = pad(encoded, pad_id), pad([[1] * len(e) for e in encoded], 0)
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                scores += logits.float().view(len(chunk), -1)[:, 0].tolist()
        return scores


def load_reward_scorer(model: str, *, batch_size: int = 8, max_length: int = 1024) -> ExchangeScorer:
    """Load a reward model: an rlft ``RewardModel`` export (folder with ``reward_config.json``, a
    :class:`~rlft.models.reward.RewardScorer`) or any ``AutoModelForSequenceClassification`` with one label (folder,
    adapter folder, hub id; a :class:`RewardModelScorer`)."""
    from pathlib import Path

    from rlft.models import load_model, load_tokenizer
    from rlft.models.reward import RewardScorer

    if (Path(model) / "reward_config.json").exists():
        return RewardScorer.from_pretrained(model, batch_size=batch_size, max_length=max_length)
    tokenizer = load_tokenizer(model, padding_side="right")
    rm = load_model(model, auto_class="AutoModelForSequenceClassification", trainable_adapter=False)
    return RewardModelScorer(rm, tokenizer, batch_size=batch_size, max_length=max_length)


def preference_accuracy(scorer: ExchangeScorer, pairs: Sequence[dict], *, n_bootstrap: int = 0, seed: int = 0) -> dict:
    """Accuracy (chosen scored above rejected; a tie counts half), pooled AUROC and mean margin on pairs.

    Args:
        scorer: Any :class:`~rlft.models.scorer.ExchangeScorer`.
        pairs: Canonical pair records ``{"prompt": [messages], "chosen": str, "rejected": str}``.
        n_bootstrap: With > 0, also ``accuracy_ci`` and ``auroc_ci``: 95 % percentile intervals over pairs
            resampled with replacement.
        seed: Bootstrap seed.
    """
    if not pairs:
        raise ValueError("preference_accuracy needs at least one pair")
    prompts = [p["prompt"] for p in pairs for _ in (0, 1)]
    responses = [p[side] for p in pairs for side in ("chosen", "rejected")]
    scores = np.asarray(scorer.score_exchanges(prompts, responses), dtype=float).reshape(len(pairs), 2)
    chosen, rejected = scores[:, 0], scores[:, 1]
    wins = np.where(chosen > rejected, 1.0, np.where(chosen == rejected, 0.5, 0.0))
    out = {
        "accuracy": float(wins.mean()),
        "auroc": pairwise_auroc(chosen.tolist(), rejected.tolist()),
        "mean_margin": float((chosen - rejected).mean()),
        "mean_chosen": float(chosen.mean()),
        "mean_rejected": float(rejected.mean()),
        "n": len(pairs),
    }
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(pairs), size=(n_bootstrap, len(pairs)))
        accuracies = wins[draws].mean(axis=1)
        aurocs = [pairwise_auroc(chosen[d].tolist(), rejected[d].tolist()) for d in draws]
        out["accuracy_ci"] = [float(x) for x in np.quantile(accuracies, [0.025, 0.975])]
        out["auroc_ci"] = [float(x) for x in np.quantile(aurocs, [0.025, 0.975])]
    return out


def is_refusal(text: str) -> bool:
    """Whether a response refuses, by the weighted rubric of :mod:`rlft.eval.refusal` (validated on a
    hand-labeled set, see ``tests/eval/data/refusal_labels.jsonl``)."""
    return RubricRefusalClassifier().is_refusal(text)


def refusal_rate(texts: Sequence[str], classifier=None) -> float:
    """Fraction of responses that refuse (``classifier(texts) -> list[bool]``; default the rubric)."""
    if not texts:
        return 0.0
    if classifier is None:
        classifier = RubricRefusalClassifier()
    return sum(map(bool, classifier(list(texts)))) / len(texts)


class ToxicityClassifier(TextScorer):
    """A local text classifier with a toxic label (e.g. a downloaded ``unitary/toxic-bert`` folder).

    The score is the probability of the label whose name contains ``toxic`` (not ``non-toxic``), else of label 1.
    """

    def __init__(self, path: str, *, batch_size: int = 16) -> None:
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
        labels = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
        toxic = [i for name, i in labels.items() if "toxic" in name and not name.startswith(("non", "not"))]
        self.index = toxic[0] if toxic else (1 if len(labels) > 1 else 0)
        self.multi_label = self.model.config.problem_type == "multi_label_classification"
        self.batch_size = batch_size

    def __call__(self, texts: list[str]) -> list[float]:
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=512,
                    return_tensors="pt",
                )
                logits = self.model(**batch).logits.float()
                probs = logits.sigmoid() if self.multi_label or logits.shape[-1] == 1 else logits.softmax(-1)
                out += probs[:, min(self.index, probs.shape[-1] - 1)].tolist()
        return out


class ProfanityCheckClassifier(TextScorer):
    """Offensive-language probability from ``alt-profanity-check`` (a linear SVM trained on human-labeled
    offensive/hateful tweets; offline, no download). Install: ``pip install alt-profanity-check``."""

    name = "alt-profanity-check (linear SVM on human-labeled offensive language)"

    def __init__(self) -> None:
        try:
            from profanity_check import predict_prob
        except ImportError as error:
            raise ImportError(
                "toxicity: profanity_check needs `pip install alt-profanity-check` (rlft[eval])"
            ) from error
        self._predict = predict_prob

    def __call__(self, texts: list[str]) -> list[float]:
        return [float(x) for x in self._predict(list(texts))] if texts else []


class DetoxifyClassifier(TextScorer):
    """Detoxify's ``original`` model (Jigsaw toxic comments); needs ``pip install detoxify`` and its weights."""

    def __init__(self, variant: str = "original") -> None:
        from detoxify import Detoxify

        self.model, self.name = Detoxify(variant), f"detoxify ({variant})"

    def __call__(self, texts: list[str]) -> list[float]:
        return [float(x) for x in self.model.predict(list(texts))["toxicity"]] if texts else []


class NamedToxicity(TextScorer):
    """A toxicity scorer plus the name of what produced it, so every number is reported with its classifier."""

    def __init__(self, classifier: Scorer, name: str) -> None:
        self.classifier, self.name = classifier, name

    def __call__(self, texts: list[str]) -> list[float]:
        return self.classifier(texts)

    def report(self, texts: Sequence[str]) -> dict:
        return {**toxicity(texts, self.classifier), "toxicity_classifier": self.name}


def load_toxicity_classifier(name: str | None) -> NamedToxicity | None:
    """``profanity_check`` (default, offline), ``detoxify``, ``none``, or a Hugging Face text-classification
    folder / hub id with a toxic label (see :class:`ToxicityClassifier`)."""
    if name in (None, "", "none"):
        return None
    if name == "profanity_check":
        classifier = ProfanityCheckClassifier()
        return NamedToxicity(classifier, classifier.name)
    if name.startswith("detoxify"):
        classifier = DetoxifyClassifier(name.partition(":")[2] or "original")
        return NamedToxicity(classifier, classifier.name)
    return NamedToxicity(ToxicityClassifier(name), f"huggingface classifier {name}")


def toxicity(texts: Sequence[str], classifier: Scorer | None) -> dict:
    """Mean toxicity and share above 0.5, or an explicit note that no classifier is available."""
    if classifier is None:
        note = (
            "not measured: no local toxicity classifier was given (use profanity_check, detoxify or a "
            "sequence-classification folder such as unitary/toxic-bert)"
        )
        return {"toxicity": None, "toxicity_note": note}
    scores = classifier(list(texts))
    return {
        "toxicity": float(np.mean(scores)) if scores else 0.0,
        "toxic_fraction": float(np.mean([s > 0.5 for s in scores])) if scores else 0.0,
    }


def policy_report(
    scorer: ExchangeScorer | None,
    prompts: Sequence[list[dict] | str],
    responses: Sequence[str],
    *,
    toxicity_classifier: Scorer | None = None,
) -> dict:
    """Mean reward (if a scorer is given), refusal rate and toxicity of a policy's responses to ``prompts``."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    out: dict = {"n": len(responses), "refusal_rate": refusal_rate(responses)}
    if scorer is not None:
        rewards = scorer.score_exchanges(list(prompts), list(responses))
        out.update(mean_reward=float(np.mean(rewards)), std_reward=float(np.std(rewards)))
    out.update(toxicity(responses, toxicity_classifier))
    if toxicity_classifier is not None and hasattr(toxicity_classifier, "name"):
        out["toxicity_classifier"] = toxicity_classifier.name
    return out
