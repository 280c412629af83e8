"""Pulling an answer out of generated text and deciding whether it is right: one implementation that GRPO/PPO
rewards (``exact_match``, ``code_tests``) and evaluation (``rlft eval accuracy``, HumanEval) share, so training and
evaluation score the same text the same way."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Iterable

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# any info string after the opening fence (```python, ```py, ```Python3 ...); an unclosed block runs to the end
_CODE_BLOCK = re.compile(r"```[^\n`]*\n(.*?)(?:```|$)", flags=re.DOTALL)


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def _boxed(text: str) -> str | None:
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1].strip() if found else None


def _answer_tag(text: str) -> str | None:
    found = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def _choice_letter(text: str) -> str | None:
    # "(B)", "B)", "Answer: B", "B." - the first standalone capital A-E wins
    match = re.search(r"(?:^|[\s(\[:])([A-E])(?:[).\]:,\s]|$)", text.strip())
    return match.group(1) if match else None


def _first_line(text: str) -> str | None:
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = " ".join(line.lower().translate(str.maketrans("", "", string.punctuation)).split())
    return line or None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "full": lambda text: text,
    "last_number": _last_number,
    "boxed": _boxed,
    "answer_tag": _answer_tag,
    "choice_letter": _choice_letter,
    "first_line": _first_line,
}
"""Extractors by name: text -> the answer it gives, or ``None`` when it gives none."""


def extractor(name: str) -> Callable[[str], str | None]:
    """A registered extractor, else ``name`` used as a regex (its first group, or the whole match, is the answer)."""
    if name in EXTRACTORS:
        return EXTRACTORS[name]
    try:
        pattern = re.compile(name, flags=re.DOTALL)
    except re.error as error:
        raise ValueError(f"extract={name!r} is neither one of {sorted(EXTRACTORS)} nor a regex") from error

    def by_regex(text: str) -> str | None:
        found = pattern.search(text)
        return None if found is None else (found.group(1) if pattern.groups else found.group(0))

    return by_regex


def normalise_answer(text: str, *, case_sensitive: bool = False) -> str:
    """Strip whitespace, surrounding quotes/``$`` and a final period; numbers compare by value (``12.0`` == ``12``)."""
    text = text.strip().strip("$").strip().rstrip(".").strip().strip("\"'`")
    try:
        number = float(text.replace(",", ""))
        return repr(int(number)) if number.is_integer() else repr(number)
    except ValueError:
        return text if case_sensitive else text.lower()


def gold_answer(gold: str, extract: Callable[[str], str | None]) -> str:
    """The reference answer as the extractor sees it: a worked solution (``... so 42``) reduces to its answer, a
    bare answer (``42``, ``B``) stays itself."""
    found = extract(gold)
    return gold if found is None else found


MISSING_REFERENCE = ("error", "skip")
"""What scoring does with a row that has no reference: refuse it (default) or skip it and count it."""


class MissingReferenceError(ValueError):
    """A row has no reference answer (absent, ``None``, NaN, empty list): scoring it would compare against the
    text ``"None"`` or ``"nan"``, so it is refused with the row and field named."""


def is_missing(value) -> bool:
    """Whether a reference value is absent: ``None`` or NaN (what Parquet/pandas give an empty cell), a blank string
    (what a CSV reader gives one: no answer matches it meaningfully), or a list of accepted answers that is empty or
    holds only such values."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, (list, tuple)):
        return all(is_missing(v) for v in value)
    try:  # pandas.NA / numpy NaN scalars: equal to nothing, not even themselves
        return bool(value != value)
    except (TypeError, ValueError):
        return False


def reference(value, *, row: int, field: str, where: str) -> str | list[str]:
    """The reference answer(s) of one row as text, refusing a missing one (see :func:`is_missing`).

    Args:
        value: The row's reference field (a string, a number, or a list of accepted answers).
        row: Index of the row, for the message.
        field: Name of the field, for the message.
        where: Who is scoring (``"exact_match reward"``, ``"rlft eval accuracy"``), for the message.

    Raises:
        MissingReferenceError: If the value is missing.
    """
    if is_missing(value):
        raise MissingReferenceError(
            f"{where}: row {row} has no reference in field {field!r} (got {value!r}); fill it in, drop the row, "
            "or ask to skip such rows (missing: skip), which scores nothing for them and counts them"
        )
    if isinstance(value, (list, tuple)):  # an accepted answer that is missing is dropped, never the text "None"
        return [str(v) for v in value if not is_missing(v)]
    return str(value)


def is_correct(completion: str, gold: str | Iterable[str], extract: str = "full", *, case_sensitive: bool = False):
    """Whether ``completion`` gives (one of) the reference answer(s) ``gold`` under extractor ``extract``.

    Returns:
        ``(correct, predicted)``: the verdict and the normalised extracted answer (``None`` when there is none).

    Raises:
        MissingReferenceError: If ``gold`` is missing (``None``, NaN, empty): callers name the row with
            :func:`reference` first; this is the last line against scoring a row against the text ``"None"``.
    """
    if is_missing(gold):
        raise MissingReferenceError(f"no reference answer to score against (got {gold!r})")
    find = extractor(extract)
    found = find(completion)
    if found is None:
        return False, None
    predicted = normalise_answer(found, case_sensitive=case_sensitive)
    accepted = [gold] if isinstance(gold, str) else [g for g in gold if not is_missing(g)]
    golds = {normalise_answer(gold_answer(str(g), find), case_sensitive=case_sensitive) for g in accepted}
    return predicted in golds, predicted


def extract_code(completion: str) -> str:
    """The first fenced code block of a chat answer, or the completion itself when it has no fence."""
    found = _CODE_BLOCK.search(completion)
    return found.group(1) if found else completion
