"""ROUGE (Lin 2004, https://aclanthology.org/W04-1013/) of generated answers against reference answers, with Google's
``rouge-score`` package (the implementation the RLHF notebooks install), as mean F1 over the examples."""

from __future__ import annotations

from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(
    predictions: Sequence[str], references: Sequence[str], types: Sequence[str] = ROUGE_TYPES
) -> dict[str, float]:
    """Mean F1 of each ROUGE type over aligned ``predictions`` and ``references`` (Porter stemming on)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references (> 0), got {len(predictions)} and {len(references)}")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for prediction, reference in zip(predictions, references):
        for name, score in scorer.score(reference, prediction).items():
            totals[name] += score.fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}


def prompts_and_references(records: Sequence[dict]) -> tuple[list[list[dict]], list[str]]:
    """From SFT records: the conversation before the last assistant turn (the prompt) and that turn (the
    reference)."""
    prompts, references = [], []
    for index, record in enumerate(records):
        if "messages" not in record:  # plain text rows have no prompt/reply split to generate from
            raise ValueError(
                f"record {index}: ROUGE needs chat data (a prompt and a reference reply), got a record with keys "
                f"{sorted(record)}; score plain text with perplexity instead"
            )
        messages = record["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise ValueError(f"record {index}: no assistant reply after a prompt to use as the ROUGE reference")
        prompts.append(messages[:last])
        references.append(messages[last]["content"])
    return prompts, references


def generated_rouge(generator, records: Sequence[dict], settings) -> tuple[dict[str, float], list[dict]]:
    """Generate an answer to each SFT record's prompt with ``generator`` (:class:`rlft.generation.Generator` or
    anything with its ``generate(prompts, settings)``) and score it against the record's reference: the metrics and
    one ``{prompt, reference, prediction}`` row per record. Shared by ``rlft eval rouge`` and the ROUGE callback."""
    prompts, references = prompts_and_references(records)
    predictions = [samples[0] for samples in generator.generate(prompts, settings)]
    rows = [
        {"prompt": prompt[-1]["content"], "reference": reference, "prediction": prediction}
        for prompt, reference, prediction in zip(prompts, references, predictions)
    ]
    return rouge(predictions, references), rows
