"""Plain text rows for continued pretraining and text perplexity: ``{"text": "..."}`` (TRL's language-modeling format).

A text row becomes the SFT record ``{"text": str}``, the text exactly as given (not stripped: indentation and
line breaks are data). It is encoded without a chat template by :func:`rlft.data.encoding.encode_text`: the
tokenizer's own special tokens for plain text (BOS where it adds one), the text, and the EOS token, every token
trained; truncated and packed like any SFT example. Other fields of the row (an id, a url, a timestamp) are not
used. There is no prompt and no reply in such a row, so the format provides ``sft`` only: prompts, pairs and
unpaired feedback are refused, each with what to use instead.
"""

from __future__ import annotations

from rlft.data.errors import RecordError, describe_value
from rlft.data.fields import Example

__all__ = ["TEXT_KEYS", "TEXT_REFUSALS", "from_text"]

TEXT_KEYS = "text (plain text, no chat template: every token trained)"
TEXT_REFUSALS = {
    "prompts": "plain text rows have no prompt/answer split to generate from; online RL needs prompt rows "
    '({"prompt": ...}) or chat rows (messages)',
    "pairs": "plain text rows have no chosen/rejected replies; preference methods need prompt/chosen/rejected rows",
    "unpaired": "plain text rows have no completion labelled true/false; KTO needs {prompt, completion, label} rows",
}


def from_text(data: dict, kind: str) -> list[Example]:
    """Input-format parser: one example holding the row's ``text``, unchanged."""
    text = data.get("text")
    if text is None:
        # most likely a row of another format in a text file (mixed rows): say what the row has
        keys, other = sorted(key for key, value in data.items() if value is not None), ""
        if keys:
            other = f" (the row has {keys}: a file holds one format; other rows go in their own file)"
        raise RecordError("text", f"missing (or null); expected the document as a string{other}", "missing field")
    if not isinstance(text, str):
        raise RecordError("text", f"expected a string, found {describe_value(text)}", "wrong type")
    if not text.strip():
        raise RecordError("text", "is empty (or only whitespace); expected the document's text", "empty text")
    return [Example([], field="text", text=text)]
