"""LLM-as-judge against a real local OpenAI-compatible HTTP server: parsing, retries, position bias, caching."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlft.eval.judge import Judge, LocalJudge, OpenAIJudge, parse_score, parse_winner
from rlft.generation.generator import Generator

pytest.importorskip("httpx")


def _reply_for(messages: list[dict]) -> str:
    text = messages[0]["content"]
    retry = len(messages) > 1
    if "[Answer A]" in text:
        if "biased" in text:
            return "The first one reads better.\nWinner: A"  # follows the position, not the content
        a = text.split("[Answer A]")[1].split("[Answer B]")[0]
        return "A is correct.\nWinner: A" if "good" in a else "B is correct.\nWinner: B"
    answer = text.split("[Answer]")[1]
    if "hopeless" in answer:
        return "I refuse to give a number."
    if "weird" in answer:
        return "**Score:** 3" if retry else "It is fine I guess."
    return "Clear and correct.\nScore: 5" if "good" in answer else "Wrong.\nScore: 1"


@pytest.fixture()
def server():
    seen = {"requests": 0, "auth": set()}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen["requests"] += 1
            seen["auth"].add(self.headers.get("Authorization"))
            if self.path != "/v1/chat/completions":
                self.send_error(404)
                return
            payload = {"choices": [{"message": {"role": "assistant", "content": _reply_for(body["messages"])}}]}
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
    httpd.shutdown()
    httpd.server_close()


def test_parsers():
    assert parse_score("Reasoning...\nScore: 4") == 4.0
    assert parse_score("**Rating**: [2]/5") == 2.0
    assert parse_score('{"score": 3}') == 3.0
    assert parse_score("Score: 9") is None and parse_score("no idea") is None
    assert parse_winner("blah\nWinner: B") == "B"
    assert parse_winner("**Verdict:** tie") == "tie"
    assert parse_winner("Answer A is nice") is None


def test_pointwise_over_http_with_retries_unparseable_bucket_and_cache(server, tmp_path, monkeypatch):
    url, seen = server
    monkeypatch.setenv("RLFT_TEST_JUDGE_KEY", "secret-key")
    cache = tmp_path / "judge.jsonl"
    judge = Judge(OpenAIJudge(url, "judge-model", api_key_env="RLFT_TEST_JUDGE_KEY"), cache_path=cache)
    prompts = ["q1", "q2", "q3", "q4"]
    responses = ["good answer", "bad answer", "weird answer", "hopeless answer"]
    result = judge.pointwise(prompts, responses)
    assert [i["score"] for i in result["items"]] == [5.0, 1.0, 3.0, None]
    assert result["mean_score"] == pytest.approx(3.0)  # the unparseable item is excluded, not counted as 0
    assert (result["scored"], result["unparseable"]) == (3, 1)
    assert result["retries"] == 3  # weird: 1 retry; hopeless: 2 retries, then given up
    assert seen["auth"] == {"Bearer secret-key"}
    first_requests = seen["requests"]
    assert first_requests == 4 + 3
    # a re-run, even in a new process (new Judge reading the cache file), asks the server nothing
    again = Judge(OpenAIJudge(url, "judge-model", api_key_env="RLFT_TEST_JUDGE_KEY"), cache_path=cache)
    assert again.pointwise(prompts, responses)["items"] == result["items"]
    assert seen["requests"] == first_requests and again.calls == 0


def test_pairwise_both_orders_cancel_position_bias(server):
    url, seen = server
    judge = Judge(OpenAIJudge(url, "judge-model", api_key_env="RLFT_UNSET_VARIABLE"))
    result = judge.pairwise(["p1", "p2", "biased"], ["good", "bad", "good"], ["bad", "good", "bad"], n_bootstrap=200)
    assert [i["outcome"] for i in result["items"]] == [1.0, 0.0, 0.5]
    assert result["win_rate"]["rate"] == pytest.approx(0.5)
    assert result["position_consistency"] == pytest.approx(2 / 3)
    assert seen["requests"] == 6 and seen["auth"] == {None}


def test_http_errors_are_reported(server):
    url, _ = server
    judge = Judge(OpenAIJudge(url.replace("/v1", "/v2"), "m"))
    with pytest.raises(ConnectionError, match="HTTP 404"):  # a user error: one line on the CLI
        judge.pointwise(["q"], ["a"])


def test_local_model_judge_counts_unparseable_replies(tiny):
    model, tok = tiny
    judge = Judge(LocalJudge(Generator(model, tok), max_new_tokens=8), max_retries=1)
    result = judge.pointwise(["What is 2+2?"], ["4"])
    # a random-init model cannot follow the format: counted as unparseable, no score invented
    assert result["n"] == 1 and result["scored"] + result["unparseable"] == 1
    if result["unparseable"]:
        assert result["mean_score"] is None and result["retries"] == 1


def test_cli_pairwise_judge_over_http_is_cached_between_runs(server, tmp_path):
    from rlft.cli.eval import main

    url, seen = server
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a colour."}\n{"prompt": "Name an animal."}\n')
    argv = [
        "judge",
        "tiny-llama",
        str(prompts),
        "--mode",
        "pairwise",
        "--baseline",
        "tiny-qwen2",
        "--api_base",
        url,
        "--api_model",
        "judge-model",
        "--max_new_tokens",
        "4",
        "--out",
        str(tmp_path / "out"),
    ]
    main(argv)
    result = json.loads((tmp_path / "out" / "judge_pairwise.json").read_text())
    assert result["metrics"]["judged"] == 2 and result["metrics"]["win_rate"]["n"] == 2
    assert seen["requests"] == 4  # two prompts, both orders
    main(argv)
    assert seen["requests"] == 4  # the second run is answered from <out>/judge_cache.jsonl


class _CriteriaBackend:
    """A judge that applies whatever criteria the prompt states: "short" favours brevity, else correctness."""

    identity = "criteria-judge"

    def complete(self, chats):
        replies = []
        for chat in chats:
            text = chat[0]["content"]
            if "[Answer A]" in text:
                a, b = text.split("[Answer A]")[1].split("[Answer B]")
                b = b.split("First explain")[0]
                shorter = "A" if len(a.strip()) < len(b.strip()) else "B"
                longer = "B" if shorter == "A" else "A"
                replies.append(f"Winner: {shorter if 'short' in text.split('[Question]')[0] else longer}")
                continue
            answer = text.split("[Answer]")[1].split("First explain")[0].strip()
            good = len(answer) < 10 if "short" in text.split("[Question]")[0] else "correct" in answer
            replies.append("Score: 5" if good else "Score: 1")
        return replies


def test_user_written_criteria_decide_the_verdicts():
    prompts, answers = ["q1", "q2"], ["ok", "a long but correct answer"]
    default = Judge(_CriteriaBackend()).pointwise(prompts, answers)
    brief = Judge(_CriteriaBackend(), criteria="prefer short answers").pointwise(prompts, answers)
    assert [i["score"] for i in default["items"]] == [1.0, 5.0]
    assert [i["score"] for i in brief["items"]] == [5.0, 1.0]
    pair = Judge(_CriteriaBackend(), criteria="short is better").pairwise(
        ["q"], ["yes"], ["a much longer reply"], n_bootstrap=50
    )
    assert pair["items"][0]["outcome"] == 1.0
