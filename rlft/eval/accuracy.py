"""Task accuracy: by generation + answer extraction, and by log-likelihood of choices (multiple choice)."""

from __future__ import annotations

from collections.abc import Sequence

from rlft.eval.scoring import continuation_logprob
from rlft.generation.generator import Generator
from rlft.generation.settings import SamplingSettings
from rlft.rl import answers


def extract_answer(text: str, extractor: str) -> str | None:
    """The answer a generation gives, or ``None`` if the extractor finds none (see :mod:`rlft.rl.answers`)."""
    return answers.extractor(extractor)(text)


def generative_accuracy(
    generator: Generator,
    items: Sequence[dict],
    *,
    extractor: str = "last_number",
    settings: SamplingSettings | None = None,
    chat: bool = True,
    missing: str = "error",
) -> dict:
    """Accuracy of generated answers.

    Args:
        generator: The batched generator.
        items: ``{"question": str, "answer": str}`` (``prompt`` is accepted for ``question``).
        extractor: Name in :data:`rlft.rl.answers.EXTRACTORS` or a regex.
        settings: Sampling settings (default greedy, 128 new tokens).
        chat: Send questions as a user message through the chat template (else as plain text).
        missing: An item whose ``answer`` is absent (``None``, NaN from an empty CSV/Parquet cell): ``error``
            (default) stops before generating, naming the item; ``skip`` leaves it out and counts it.

    Returns:
        ``accuracy``, ``n`` (items scored), ``no_answer`` (generations where nothing could be extracted),
        ``skipped_missing_reference`` and per-item rows.

    Raises:
        rlft.rl.answers.MissingReferenceError: An item has no answer and ``missing`` is ``error``.
    """
    if missing not in answers.MISSING_REFERENCE:
        raise ValueError(f"missing must be one of {answers.MISSING_REFERENCE}, got {missing!r}")
    find = answers.extractor(extractor)
    questions, kept, skipped = [], [], 0
    for i, item in enumerate(items):
        question = item.get("question", item.get("prompt"))
        if question is None or "answer" not in item:
            raise ValueError(f"item {i} needs 'question' (or 'prompt') and 'answer' fields, got {sorted(item)}")
        if missing == "skip" and answers.is_missing(item["answer"]):
            skipped += 1
            continue
        # checked before any generation: str(None) would be scored as the answer "None"
        kept.append((item, answers.reference(item["answer"], row=i, field="answer", where="rlft eval accuracy")))
        questions.append([{"role": "user", "content": question}] if chat else question)
    outputs = generator.generate(questions, settings or SamplingSettings(max_new_tokens=128)) if questions else []
    rows, correct, no_answer = [], 0, 0
    for (item, gold_text), samples in zip(kept, outputs):
        hit, predicted = answers.is_correct(samples[0], gold_text, extractor)
        golds = [gold_text] if isinstance(gold_text, str) else gold_text
        gold = " | ".join(answers.normalise_answer(answers.gold_answer(g, find)) for g in golds)
        correct += hit
        no_answer += predicted is None
        rows.append(
            {
                "question": item.get("question", item.get("prompt")),
                "generation": samples[0],
                "predicted": predicted,
                "gold": gold,
                "correct": hit,
            }
        )
    n = len(kept)
    return {
        "accuracy": correct / n if n else 0.0,
        "n": n,
        "no_answer": no_answer,
        "skipped_missing_reference": skipped,
        "rows": rows,
    }


def choice_item(row: dict, index: int = 0) -> dict:
    """Normalise a multiple-choice row: PIQA (goal/sol1/sol2/label) or question/choices/label (or answer index)."""
    if {"goal", "sol1", "sol2", "label"} <= row.keys():
        _known_label(row["label"], index, "label")
        return {
            "context": f"Question: {row['goal']}\nAnswer:",
            "choices": [row["sol1"], row["sol2"]],
            "label": int(row["label"]),
        }
    if "choices" in row and ("label" in row or "answer" in row):
        label = row.get("label", row.get("answer"))
        _known_label(label, index, "label" if "label" in row else "answer")
        choices = list(row["choices"])
        label = choices.index(label) if isinstance(label, str) and label in choices else _index(label, index, choices)
        context = row.get("context") or f"Question: {row.get('question', '')}\nAnswer:"
        return {"context": context, "choices": choices, "label": label}
    raise ValueError(
        f"row {index}: multiple-choice rows need PIQA fields (goal, sol1, sol2, label) or question/choices/label, "
        f"got {sorted(row)}"
    )


def _index(label, index: int, choices: list) -> int:
    try:
        return int(label)
    except (TypeError, ValueError):
        raise ValueError(f"row {index}: label {label!r} is neither a choice index nor one of {choices}") from None


def _known_label(label, index: int, field: str) -> None:
    # int(None) is a TypeError and int(nan) a message without the row; say which row and field instead
    if answers.is_missing(label):
        answers.reference(label, row=index, field=field, where="rlft eval accuracy (multiple choice)")


def multiple_choice_accuracy(model, tokenizer, items: Sequence[dict], *, batch_size: int = 8) -> dict:
    """Pick the choice with the highest log-likelihood given the context (PIQA/lm-eval style).

    Reports ``accuracy`` (sum of log-probs) and ``accuracy_norm`` (log-prob per character of the choice, which
    removes the bias towards short answers), as lm-eval's ``acc`` and ``acc_norm`` do.

    Args:
        model: Causal LM.
        tokenizer: Its tokenizer.
        items: Rows accepted by :func:`choice_item`.
        batch_size: Sequences per forward pass.
    """
    normalised = [choice_item(row, i) for i, row in enumerate(items)]
    pairs, spans = [], []
    for item in normalised:
        if not 0 <= item["label"] < len(item["choices"]):
            raise ValueError(f"label {item['label']} is out of range for {len(item['choices'])} choices")
        spans.append((len(pairs), len(pairs) + len(item["choices"])))
        pairs += [(item["context"], " " + str(choice).strip()) for choice in item["choices"]]
    scores = continuation_logprob(model, tokenizer, pairs, batch_size=batch_size)
    correct = correct_norm = 0
    predictions = []
    for item, (lo, hi) in zip(normalised, spans):
        logps = [scores[j][0] for j in range(lo, hi)]
        per_char = [lp / max(1, len(pairs[j][1].strip())) for lp, j in zip(logps, range(lo, hi))]
        pick = max(range(len(logps)), key=logps.__getitem__)
        pick_norm = max(range(len(per_char)), key=per_char.__getitem__)
        correct += pick == item["label"]
        correct_norm += pick_norm == item["label"]
        predictions.append({"pred": pick, "pred_norm": pick_norm, "label": item["label"], "logps": logps})
    n = len(normalised)
    return {
        "accuracy": correct / n if n else 0.0,
        "accuracy_norm": correct_norm / n if n else 0.0,
        "n": n,
        "predictions": predictions,
    }
