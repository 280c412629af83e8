"""Chat-template encoding with token-exact assistant labels.

The template is rendered incrementally: for assistant turn *i*, ``render(messages[:i], add_generation_prompt=True)``
is a prefix of ``render(messages[:i+1])``, and the difference is exactly what the model must produce — the content
followed by the end-of-turn token. Each piece is tokenized on its own (no special tokens added, the template already
holds BOS where the model wants one), so labels can never leak prompt tokens and BOS is never doubled.

Message contents are text, never control tokens: a reply that *mentions* ``<|eot_id|>`` or ``<|im_end|>`` (data about
tokenizers does) would otherwise be encoded with a real end-of-turn token there, and everything after it would
silently leave the loss. Before rendering, every special-token string inside a content is swapped for a private-use
placeholder; after rendering, the text between the template's own special tokens is tokenized with the
placeholders turned back into the literal and ``split_special_tokens=True`` (ordinary text tokens). Contents without
such a literal are tokenized exactly as before.

Tool use (assistant ``tool_calls``, ``tool`` results, a conversation's ``tools``) reaches the template through
:func:`rlft.data.tool_messages.template_inputs`, the one rule SFT and ``rlft serve`` share; the calls are part of
the assistant turn, so they are trained, and tool results are prompt text like user turns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlft.data.tool_messages import template_inputs
from rlft.logprobs import IGNORE_INDEX


class TemplateError(ValueError):
    """The chat template cannot be split into prompt and assistant parts."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside the trained assistant tokens
    truncated: bool = False


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, extra: dict | None = None) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(extra or {})
    )


def _for_template(tokenizer, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], dict]:
    """The messages and extra template arguments that show tool calls and ``tools`` (unchanged without them)."""
    try:
        return template_inputs(tokenizer, messages, tools)
    except ValueError as error:  # e.g. two calls in one turn for a model whose format holds one
        raise TemplateError(f"the conversation's tool calls cannot be written for this model: {error}") from error


# Private-use code points: no tokenizer treats them as special and no template rewrites them.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


class _Literals:
    """Swaps special-token strings inside message contents for placeholders and back.

    Attributes:
        specials: The tokenizer's special-token strings, longest first (so ``<|im_end|>`` is not cut by ``<|im``).
        pattern: Matches any of them.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.specials = sorted(_special_strings(tokenizer), key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, self.specials))) if self.specials else None
        self.used = False

    def escape(self, messages: list[dict]) -> list[dict]:
        """Messages whose contents hold placeholders instead of special-token strings."""
        if self.pattern is None:
            return messages
        escaped = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, str) and self.pattern.search(content):
                self.used = True
                content = self.pattern.sub(lambda m: f"{_OPEN}{self.specials.index(m.group())}{_CLOSE}", content)
                message = {**message, "content": content}
            escaped.append(message)
        return escaped

    def restore(self, text: str) -> str:
        return _PLACEHOLDER.sub(lambda m: self.specials[int(m.group(1))], text)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of rendered text: the template's specials as tokens, each content literal as plain text."""
        if not self.used or _OPEN not in text:
            return _tokenize(self.tokenizer, text)
        ids: list[int] = []
        # the placeholders took the literals out, so every special string left in `text` is the template's own
        pieces = self.pattern.split(text)
        templates = self.pattern.findall(text)
        for index, piece in enumerate(pieces):
            if piece:
                ids += self._as_text(self.restore(piece))
            if index < len(templates):
                ids += _tokenize(self.tokenizer, templates[index])
        return ids

    def _as_text(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        found = sorted({s for s in self.specials if s in text})
        # only the literals' own ids count: an <unk> for an unknown character is not a literal kept as a token
        if set(ids) & set(self.tokenizer.convert_tokens_to_ids(found)):
            raise TemplateError(
                f"a message contains the special-token string(s) {found}, which this tokenizer cannot encode as "
                "text (split_special_tokens is not supported); they would end the turn early. Remove or escape "
                "them in the data"
            )
        return ids


def _special_strings(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return [s for s in specials if s]


def _end_of_turn(span: str, specials: list[str]) -> int:
    """Index just after the first special token in ``span`` (the end-of-turn marker); what follows is not trained."""
    hits = [(i, len(s)) for s in specials if (i := span.find(s)) > 0]
    if hits:
        start, length = min(hits)
        return start + length
    return len(span.rstrip())


def conversation_segments(
    tokenizer, messages: list[dict], train_on: str = "all", tools: list[dict] | None = None
) -> list[tuple[str, bool]]:
    """Split the rendered conversation into ``(text, is_trained)`` pieces whose concatenation is the full render.

    Args:
        train_on: ``"all"`` trains every assistant turn, ``"last"`` only the final one.
        tools: JSON schemas of the tools the conversation may call, shown to the model.
    """
    messages, extra = _for_template(tokenizer, messages, tools)
    literals = _Literals(tokenizer)
    segments = _segments(tokenizer, literals.escape(messages), train_on, literals.specials, extra)
    return [(literals.restore(text), is_trained) for text, is_trained in segments]


def _segments(
    tokenizer, messages: list[dict], train_on: str, specials: list[str], extra: dict
) -> list[tuple[str, bool]]:
    """:func:`conversation_segments` of messages whose content literals are already escaped."""
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = set(assistant_turns if train_on == "all" else assistant_turns[-1:])
    segments: list[tuple[str, bool]] = []
    done = ""
    for i in assistant_turns:
        prefix = _render(tokenizer, messages[:i], True, extra) if i else _generation_prompt_only(tokenizer, extra)
        upto = _render(tokenizer, messages[: i + 1], extra=extra)
        if not prefix.startswith(done) or not upto.startswith(prefix) or upto == prefix:
            raise TemplateError(
                "the chat template does not render conversations incrementally (turn "
                f"{i} changes earlier text, or add_generation_prompt is ignored), so assistant tokens cannot be "
                "located exactly; set a different chat template on the tokenizer"
            )
        span = upto[len(prefix) :]
        cut = _end_of_turn(span, specials)
        segments += [(prefix[len(done) :], False), (span[:cut], i in trained), (span[cut:], False)]
        done = upto
    full = _render(tokenizer, messages, extra=extra)
    if not full.startswith(done):
        raise TemplateError("the chat template renders the full conversation differently from its turns")
    segments.append((full[len(done) :], False))
    return [(text, is_trained) for text, is_trained in segments if text]


def _generation_prompt_only(tokenizer, extra: dict) -> str:
    try:
        return _render(tokenizer, [], True, extra)
    except Exception as error:  # noqa: BLE001 - some templates index messages[0]
        raise TemplateError("conversation starts with an assistant turn; the template needs a prompt") from error


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(
    tokenizer, messages: list[dict], *, train_on: str = "all", tools: list[dict] | None = None
) -> Encoded:
    """Token ids and labels of a whole conversation (no truncation), showing the model ``tools`` when given."""
    messages, extra = _for_template(tokenizer, messages, tools)
    literals = _Literals(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_trained in _segments(tokenizer, literals.escape(messages), train_on, literals.specials, extra):
        ids = literals.tokenize(text)
        input_ids += ids
        labels += ids if is_trained else [IGNORE_INDEX] * len(ids)
    return Encoded(input_ids, labels)


def encode_prompt(
    tokenizer, prompt: list[dict], *, max_length: int | None = None, tools: list[dict] | None = None
) -> Encoded:
    """The prompt with the generation header, left-truncated to keep its end (what the model answers)."""
    prompt, extra = _for_template(tokenizer, prompt, tools)
    literals = _Literals(tokenizer)
    ids = literals.tokenize(_render(tokenizer, literals.escape(prompt), True, extra))
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids = ids[-max_length:]
    return Encoded(ids, [IGNORE_INDEX] * len(ids), truncated)


def truncate(
    prompt_ids: list[int], response: list[list[int]], max_length: int
) -> tuple[list[int], list[list[int]], bool]:
    """Fit prompt + the longest response into ``max_length``: cut the prompt's start, then responses' ends.

    The prompt keeps at least half the budget (or all of itself if shorter), so a long response cannot erase the
    question it answers.
    """
    longest = max(len(r) for r in response)
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, response, False
    keep_prompt = max(max_length - longest, min(len(prompt_ids), max_length // 2))
    keep_response = max_length - keep_prompt
    return prompt_ids[len(prompt_ids) - keep_prompt :], [r[:keep_response] for r in response], True


def encode_sft(tokenizer, messages: list[dict], *, max_length: int, tools: list[dict] | None = None) -> Encoded:
    """A conversation trained on every assistant turn; too long -> keep the end of the prompt before the last turn."""
    enc = encode_conversation(tokenizer, messages, tools=tools)
    if len(enc.input_ids) <= max_length:
        return enc
    last_turn = _last_trained_start(enc.labels)
    prompt, (response,), _ = truncate(enc.input_ids[:last_turn], [enc.input_ids[last_turn:]], max_length)
    prompt_labels = enc.labels[:last_turn][len(enc.labels[:last_turn]) - len(prompt) :]
    return Encoded(prompt + response, prompt_labels + enc.labels[last_turn:][: len(response)], True)


def encode_text(tokenizer, text: str, *, max_length: int | None = None, eos: bool = True) -> Encoded:
    """Plain text without a chat template (language modeling, continued pretraining): every token is trained.

    The tokenizer adds the special tokens it adds to any plain text (BOS for Llama, nothing for Qwen); ``eos``
    appends its EOS token (unless the tokenizer already did), so the model learns where a document ends, packed or
    not. Special-token strings inside the text are text, as in message contents (:class:`_Literals`). Longer than
    ``max_length``: the start is kept, and a cut text has no EOS (it does not end there).
    """
    literals = _Literals(tokenizer)
    if literals.pattern is not None and literals.pattern.search(text):
        literals._as_text(text)  # raises TemplateError when this tokenizer cannot encode them as text
    ids = tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]
    eos_id = tokenizer.eos_token_id
    if eos and eos_id is not None and (not ids or ids[-1] != eos_id):
        ids = [*ids, eos_id]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids = ids[:max_length]
    return Encoded(ids, list(ids), truncated)


def _last_trained_start(labels: list[int]) -> int:
    start = len(labels)
    while start > 0 and labels[start - 1] == IGNORE_INDEX:
        start -= 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def encode_pair(tokenizer, prompt: list[dict], chosen: str, rejected: str, *, max_length: int) -> dict:
    """Prompt, chosen and rejected ids sharing one prompt encoding; labels cover the final assistant reply only."""
    encoded = [
        encode_conversation(tokenizer, [*prompt, {"role": "assistant", "content": reply}], train_on="last")
        for reply in (chosen, rejected)
    ]
    starts = [_last_trained_start(e.labels) for e in encoded]
    prompt_ids = encoded[0].input_ids[: starts[0]]
    if encoded[1].input_ids[: starts[1]] != prompt_ids:
        raise TemplateError("chosen and rejected render different prompts; the chat template depends on the reply")
    responses = [e.input_ids[s:] for e, s in zip(encoded, starts)]
    response_labels = [e.labels[s:] for e, s in zip(encoded, starts)]
    prompt_ids, responses, truncated = truncate(prompt_ids, responses, max_length)
    response_labels = [lab[: len(r)] for lab, r in zip(response_labels, responses)]
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": responses[0],
        "chosen_labels": response_labels[0],
        "rejected_ids": responses[1],
        "rejected_labels": response_labels[1],
        "truncated": truncated,
    }


def encode_completion(tokenizer, prompt: list[dict], completion: str, *, max_length: int) -> dict:
    """Prompt and completion ids of one unpaired example (KTO); labels cover the completion only."""
    encoded = encode_conversation(tokenizer, [*prompt, {"role": "assistant", "content": completion}], train_on="last")
    start = _last_trained_start(encoded.labels)
    prompt_ids, (completion_ids,), truncated = truncate(
        encoded.input_ids[:start], [encoded.input_ids[start:]], max_length
    )
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "completion_labels": encoded.labels[start:][: len(completion_ids)],
        "truncated": truncated,
    }
