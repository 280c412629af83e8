"""The model card of an ``rlft export`` output: the source's rlft card carried over (its settings, data hashes,
steps and metrics) with the metadata and "how to load" of the new folder, or a fresh card when the source has none.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from rlft.models.checkpoint import checkpoint_hparams, is_checkpoint
from rlft.models.model_card import (
    CardFacts,
    card_text,
    front_matter,
    load_snippet,
    parse_front_matter,
    read_front_matter,
)

_FOLDER_KINDS = {
    "sequence_classification": "a transformers sequence-classification folder",
    "transformers": "a plain transformers folder (LoRA merged into the base weights)",
    "onnx": "an ONNX decoder folder",
}


def _source_card(model: str) -> Path | None:
    folder = Path(model)
    card = folder / "README.md" if folder.is_dir() else folder.parent / "README.md"
    if card.is_file() and "rlft" in (read_front_matter(card).get("tags") or []):
        return card
    return None


def write_export_card(out: Path, model: str, *, usage: str, kind: str | None = None) -> Path:
    """Write ``out/README.md`` for a folder exported from ``model`` (any model string).

    Args:
        out: The exported folder.
        model: What was exported.
        usage: The new folder's kind (``transformers`` or ``sequence_classification``; see ``rlft.models.model_card``).
        kind: What the note calls the folder (default from ``usage``).
    """
    note = f"Exported by `rlft export` from `{model}` as {_FOLDER_KINDS.get(kind or usage, kind or usage)}."
    source = _source_card(model)
    if source is None:
        hparams = checkpoint_hparams(model) if is_checkpoint(model) else {}
        facts = CardFacts(
            base_model=str(hparams.get("model", model)),
            method="export",
            usage=usage,
            settings={k: v for k, v in hparams.items() if k not in ("model", "output_dir")},
            notes=[note],
        )
        text = card_text(facts)
    else:
        text = _carry_over(source.read_text(), usage, note)
    path = out / "README.md"
    path.write_text(text)
    return path


def _carry_over(text: str, usage: str, note: str) -> str:
    """The source card with the new folder's library, tags and loading snippet, and a note saying where it came
    from; the body (settings, data hashes, results) is the training run's and stays."""
    meta = parse_front_matter(text)
    body = text[text.index("\n---", 4) + 4 :].lstrip("\n")
    fresh = front_matter(CardFacts(base_model=meta.get("base_model", ""), method="export", usage=usage))
    meta["library_name"] = fresh["library_name"]
    if "pipeline_tag" in fresh:
        meta["pipeline_tag"] = fresh["pipeline_tag"]
    sections = body.split("\n## ")
    for i, section in enumerate(sections):
        if section.startswith("How to load"):
            sections[i] = f"How to load\n\n```python\n{load_snippet(usage)}\n```\n"
    body = "\n## ".join(sections)
    title, _, rest = body.partition("\n\n")
    return "\n".join(
        ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", title, "", f"> **Note:** {note}", "", rest]
    )
