"""LLM-as-judge: pointwise 1-5 scores with reasoning, and pairwise A/B judged in both orders.

Backends turn a chat (list of messages) into the judge's reply: a local model through rlft's generator, or any
OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server, hosted APIs; key from an environment
variable). Replies are parsed robustly; a reply that still cannot be parsed after the retries lands in a counted
``unparseable`` bucket and is left out of the averages - never silently scored 0. Every reply is cached on disk by
the exact request, so re-running an evaluation costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rlft.generation.generator import Generator
from rlft.generation.settings import SamplingSettings
from rlft.metrics import win_rate

POINTWISE_CRITERIA = "1 (useless or harmful) to 5 (excellent: correct, helpful, clear)"
PAIRWISE_CRITERIA = (
    "Decide which answer is more helpful, correct and harmless. Ignore length unless it matters for quality."
)

POINTWISE_TEMPLATE = """You are a strict, fair judge of AI assistant answers.
Rate the answer to the question on a scale of 1 to 5. Criteria: {criteria}

[Question]
{prompt}

[Answer]
{response}

First explain your reasoning in one or two sentences, then give the rating on its own last line as "Score: N"."""

PAIRWISE_TEMPLATE = """You are a strict, fair judge comparing two AI assistant answers to the same question.
{criteria}

[Question]
{prompt}

[Answer A]
{response_a}

[Answer B]
{response_b}

First explain your reasoning in one or two sentences, then give the verdict on its own last line as
"Winner: A", "Winner: B" or "Winner: tie"."""

RETRY_REMINDER = 'Your reply did not end with the required line. Reply again and end with exactly "{form}".'

_SCORE = re.compile(
    r"(?:score|rating)\s*(?:\*\*)?\s*[:=]?\s*(?:\*\*)?\s*\[?\s*([1-5](?:\.\d+)?)\s*\]?(?:\s*/\s*5)?", re.IGNORECASE
)
_WINNER = re.compile(
    r"(?:winner|verdict|better answer)\s*(?:\*\*)?\s*[:=]?\s*(?:\*\*)?\s*\[?\s*(?:answer\s*)?"
    r"(A|B|tie|draw|equal)\b",
    re.IGNORECASE,
)

log = logging.getLogger(__name__)


def parse_score(reply: str) -> float | None:
    """The 1-5 rating in a judge reply (last ``Score: N``, or JSON ``{"score": N}``), else ``None``."""
    try:
        data = json.loads(reply.strip())
        if isinstance(data, dict) and isinstance(data.get("score"), (int, float)) and 1 <= data["score"] <= 5:
            return float(data["score"])
    except ValueError:
        pass
    found = _SCORE.findall(reply)
    return float(found[-1]) if found and 1 <= float(found[-1]) <= 5 else None


def parse_winner(reply: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a judge reply (last ``Winner: X``), else ``None``."""
    found = _WINNER.findall(reply)
    if not found:
        return None
    verdict = found[-1].lower()
    return verdict.upper() if verdict in ("a", "b") else "tie"


class JudgeBackend(Protocol):
    """Something that answers chats; ``identity`` names it in cache keys."""

    identity: str

    def complete(self, chats: Sequence[list[dict]]) -> list[str]: ...


class LocalJudge:
    """A local model as judge (greedy, through the batched generator)."""

    def __init__(self, generator: Generator, *, name: str = "local", max_new_tokens: int = 256) -> None:
        self.generator, self.max_new_tokens = generator, max_new_tokens
        self.identity = f"local:{name}"

    def complete(self, chats: Sequence[list[dict]]) -> list[str]:
        outputs = self.generator.generate(list(chats), SamplingSettings(max_new_tokens=self.max_new_tokens))
        return [samples[0] for samples in outputs]


class OpenAIJudge:
    """Any OpenAI-compatible chat-completions endpoint.

    Args:
        base_url: Server root including the version, e.g. ``http://localhost:8000/v1`` or
            ``https://api.openai.com/v1``.
        model: Model name the server expects.
        api_key_env: Environment variable holding the key (sent as a Bearer token; none is sent if it is unset).
        temperature: Sampling temperature (0 for reproducible judging).
        max_tokens: Longest reply.
        timeout_s: Per-request timeout.
        max_concurrency: Requests in flight at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 512,
        timeout_s: float = 60.0,
        max_concurrency: int = 4,
    ) -> None:
        import httpx

        headers = {"Content-Type": "application/json"}
        if key := os.environ.get(api_key_env):
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.max_concurrency = max_concurrency
        self.identity = f"openai:{base_url.rstrip('/')}:{model}:t={temperature}"

    def _one(self, chat: list[dict]) -> str:
        body = {"model": self.model, "messages": chat, "temperature": self.temperature, "max_tokens": self.max_tokens}
        import httpx

        where = f"judge endpoint {self.client.base_url}"
        try:
            response = self.client.post("/chat/completions", json=body)
        except httpx.HTTPError as error:  # refused, unresolvable, timed out: the --api_base to fix
            raise ConnectionError(f"{where} cannot be reached: {type(error).__name__}: {error}") from None
        if response.status_code >= 400:
            raise ConnectionError(f"{where} answered HTTP {response.status_code}: {response.text[:300]}")
        try:
            return response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, LookupError, TypeError):
            raise ConnectionError(f"{where} did not answer in the OpenAI chat format: {response.text[:300]}") from None

    def complete(self, chats: Sequence[list[dict]]) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(self._one, chats))


class JudgeCache:
    """Judge replies on disk (JSON lines), keyed by a hash of the backend identity and the exact chat."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, str] = {}
        self.lock = threading.Lock()
        self.torn_at: int | None = None  # byte offset of a partial last line, which the next write replaces
        self.newline_first = False
        if self.path and self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            lines = text.split("\n")  # json.dumps escapes every other line break
            # where an unfinished last line starts (a write cut by a kill), in bytes
            cut = None if text.endswith("\n") else len(text[: text.rfind("\n") + 1].encode("utf-8"))
            for number, line in enumerate(lines, 1):
                if line.strip():
                    self._read(line, number, cut if number == len(lines) else None)
            self.newline_first = cut is not None and self.torn_at is None  # a whole last line without its newline

    def _read(self, line: str, number: int, torn: int | None) -> None:
        try:
            item = json.loads(line)
            key, reply = item["key"], item["reply"]
            if not isinstance(key, str) or not isinstance(reply, str):
                raise TypeError
        except (ValueError, LookupError, TypeError):
            if (
                torn is not None
            ):  # a run killed mid-write: that reply is asked again, and the next write replaces the line
                log.warning("%s:%d: torn last line of the judge cache ignored", self.path, number)
                self.torn_at = torn
                return
            raise ValueError(
                f"{self.path}:{number}: not a judge cache line ({{key, reply}} as JSON); use another --cache file"
            ) from None
        self.entries[key] = reply

    @staticmethod
    def key(identity: str, chat: list[dict]) -> str:
        return hashlib.sha256(json.dumps([identity, chat], sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, reply: str) -> None:
        with self.lock:
            self.entries[key] = reply
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if self.torn_at is not None:
                    with open(self.path, "r+b") as f:
                        f.truncate(self.torn_at)
                    self.torn_at = None
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("\n" * self.newline_first + json.dumps({"key": key, "reply": reply}) + "\n")
                self.newline_first = False


@dataclass
class Judge:
    """Ask, parse, retry, count and cache.

    Args:
        backend: :class:`LocalJudge`, :class:`OpenAIJudge` or anything with ``identity`` and ``complete(chats)``.
        cache_path: JSON-lines cache file (``None`` keeps the cache in memory only).
        max_retries: Extra attempts for a reply that cannot be parsed (each adds a reminder turn).
        criteria: What the judge weighs, in your words (e.g. "concise answers that cite the source; refusals of
            unsafe requests are good"); default :data:`POINTWISE_CRITERIA` / :data:`PAIRWISE_CRITERIA`. The
            verdict format and the position-swapping stay rlft's, so the numbers parse and compare.
    """

    backend: JudgeBackend
    cache_path: str | Path | None = None
    max_retries: int = 2
    criteria: str | None = None

    def __post_init__(self) -> None:
        self.cache = JudgeCache(self.cache_path)
        self.calls = 0  # requests that reached the backend (cache misses)

    def _ask(self, chats: list[list[dict]]) -> list[str]:
        keys = [JudgeCache.key(self.backend.identity, c) for c in chats]
        missing = [i for i, k in enumerate(keys) if self.cache.get(k) is None]
        if missing:
            replies = self.backend.complete([chats[i] for i in missing])
            self.calls += len(missing)
            for i, reply in zip(missing, replies):
                self.cache.put(keys[i], reply)
        return [self.cache.get(k) for k in keys]

    def _ask_parsed(self, chats: list[list[dict]], parse, form: str) -> tuple[list, list[str], int]:
        """Parsed answers (``None`` = unparseable after retries), the final replies, and retries used."""
        replies = self._ask(chats)
        parsed = [parse(r) for r in replies]
        current = list(chats)  # each retry continues the conversation, so it is a new request (and cache key)
        retries = 0
        for _ in range(self.max_retries):
            todo = [i for i, p in enumerate(parsed) if p is None]
            if not todo:
                break
            retries += len(todo)
            reminder = {"role": "user", "content": RETRY_REMINDER.format(form=form)}
            for i in todo:
                current[i] = current[i] + [{"role": "assistant", "content": replies[i]}, reminder]
            for i, reply in zip(todo, self._ask([current[i] for i in todo])):
                replies[i], parsed[i] = reply, parse(reply)
        return parsed, replies, retries

    def pointwise(self, prompts: Sequence[str], responses: Sequence[str]) -> dict:
        """1-5 scores with the judge's reasoning; the mean is over parseable replies only."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        criteria = self.criteria or POINTWISE_CRITERIA
        chats = [
            [{"role": "user", "content": POINTWISE_TEMPLATE.format(prompt=p, response=r, criteria=criteria)}]
            for p, r in zip(prompts, responses)
        ]
        scores, replies, retries = self._ask_parsed(chats, parse_score, "Score: N")
        valid = [s for s in scores if s is not None]
        return {
            "mean_score": sum(valid) / len(valid) if valid else None,
            "n": len(scores),
            "scored": len(valid),
            "unparseable": len(scores) - len(valid),
            "retries": retries,
            "items": [{"score": s, "reasoning": r} for s, r in zip(scores, replies)],
        }

    def pairwise(
        self,
        prompts: Sequence[str],
        candidate: Sequence[str],
        baseline: Sequence[str],
        *,
        n_bootstrap: int = 2000,
        seed: int = 0,
    ) -> dict:
        """Candidate vs baseline, each prompt judged twice with the answers swapped to cancel position bias.

        Per prompt: a win needs both orders to prefer the candidate (or one order plus a tie); opposite verdicts
        (the judge followed the position, not the content) count as a tie. Prompts with an unparseable verdict in
        either order are left out and counted.
        """
        if not len(prompts) == len(candidate) == len(baseline):
            raise ValueError("prompts, candidate and baseline must have the same length")

        criteria = self.criteria or PAIRWISE_CRITERIA

        def chat(p: str, a: str, b: str) -> list[dict]:
            text = PAIRWISE_TEMPLATE.format(prompt=p, response_a=a, response_b=b, criteria=criteria)
            return [{"role": "user", "content": text}]

        chats = [chat(p, c, b) for p, c, b in zip(prompts, candidate, baseline)]
        chats += [chat(p, b, c) for p, c, b in zip(prompts, candidate, baseline)]
        verdicts, _, retries = self._ask_parsed(chats, parse_winner, "Winner: A")
        first, swapped = verdicts[: len(prompts)], verdicts[len(prompts) :]
        value = {"A": 1.0, "tie": 0.5, "B": 0.0}
        outcomes, items, consistent = [], [], 0
        for v1, v2 in zip(first, swapped):
            if v1 is None or v2 is None:
                items.append({"candidate_first": v1, "baseline_first": v2, "outcome": None})
                continue
            # candidate's score from each order: as A in the first, as B in the swapped one
            s = (value[v1] + (1.0 - value[v2])) / 2
            outcome = 1.0 if s > 0.5 else 0.0 if s < 0.5 else 0.5
            consistent += (v1 == "tie" and v2 == "tie") or (v1 != "tie" and v2 != "tie" and v1 != v2)
            outcomes.append(outcome)
            items.append({"candidate_first": v1, "baseline_first": v2, "outcome": outcome})
        result = {
            "n": len(prompts),
            "judged": len(outcomes),
            "unparseable": len(prompts) - len(outcomes),
            "retries": retries,
            "position_consistency": consistent / len(outcomes) if outcomes else None,
            "items": items,
        }
        result["win_rate"] = win_rate(outcomes, n_bootstrap=n_bootstrap, seed=seed).to_dict() if outcomes else None
        return result
