"""A scripted sampling backend for agent tests: the "model" calls the calculator on its first turn and answers with
the tool's result on the next, whatever the weights say. It lets a test check the multi-turn machinery (masks,
log-probs, tool execution, rewards over the conversation) exactly, with a real model scoring the tokens.

Select it as ``decoder: {backend: my_pkg.agent_script:scripted}``. The numbers come from the prompt's last
``a * b`` (or ``a + b``); ``SCRIPT_MODE=wrong`` answers a wrong number, ``SCRIPT_MODE=bad_call`` writes an invalid
call, ``SCRIPT_MODE=hostile`` calls the python tool with a program that tries to escape.
"""

from __future__ import annotations

import json
import os
import re

import torch

from rlft.models import load_tokenizer

_TOKENIZER = None
# writes a file on the host, reads the host's accounts, opens a socket, then forks without end
HOSTILE = (
    "import os, socket\n"
    "for attempt in (lambda: open(os.environ.get('MARKER', '/tmp/rlft-escape-marker'), 'w').write('x'),\n"
    "                lambda: print(open('/etc/passwd').read()),\n"
    "                lambda: socket.create_connection(('127.0.0.1', 22), timeout=1)):\n"
    "    try:\n"
    "        attempt()\n"
    "    except Exception as error:\n"
    "        print('blocked:', type(error).__name__, flush=True)\n"
    "while True:\n"
    "    os.fork()\n"
)


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = load_tokenizer("tiny-llama")
    return _TOKENIZER


def turn_text(context: str) -> str:
    """What the script says next, given the conversation so far (rendered with the Llama 3 template)."""
    results = re.findall(r"tool<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", context, re.DOTALL)
    if results:
        answer = results[-1].strip()
        if os.environ.get("SCRIPT_MODE") == "wrong":
            answer = answer + "1"
        return f"The answer is {answer}."
    if os.environ.get("SCRIPT_MODE") == "hostile":  # a program that tries to leave the sandbox
        return "<tool_call>\n" + json.dumps({"name": "python", "arguments": {"code": HOSTILE}}) + "\n</tool_call>"
    expression = re.findall(r"(\d+ ?[*+] ?\d+)", context)[-1]
    if os.environ.get("SCRIPT_MODE") == "bad_call":
        return '<tool_call>\n{"name": "calculator", "arguments": {"expression": \n</tool_call>'
    call = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
    return f"<tool_call>\n{call}\n</tool_call>"


def scripted(model, prompt_ids, prompt_mask, request):
    tok = _tokenizer()
    rows = []
    for ids, mask in zip(prompt_ids, prompt_mask):
        context = tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=False)
        # one token per character: not how the tokenizer would encode the text (a re-encoding would differ)
        tokens = [t for ch in turn_text(context) for t in tok(ch, add_special_tokens=False)["input_ids"]]
        tokens = tokens + [tok.convert_tokens_to_ids("<|eot_id|>")]
        for _ in range(request.group_size):
            rows.append(tokens[: request.max_new_tokens])
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), request.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out.to(prompt_ids.device)
