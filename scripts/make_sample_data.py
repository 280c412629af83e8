"""Write rlft's own small demo data sets into rlft/assets (deterministic; re-run to regenerate).

The data is written by the project: short factual/arithmetic/instruction tasks with a correct, polite answer
(SFT and "chosen") and a wrong or unhelpful one ("rejected"), plus prompts with a reference answer for RL rewards.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "rlft" / "assets"

FACTS = [
    ("What is the capital of France?", "The capital of France is Paris.", "France does not have a capital."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "The capital of Japan is Beijing."),
    ("How many days are in a week?", "A week has seven days.", "A week has ten days."),
    ("What colour is a clear daytime sky?", "A clear daytime sky is blue.", "Why would I tell you that?"),
    ("What do bees make?", "Bees make honey and beeswax.", "Bees make milk."),
    ("What is H2O?", "H2O is water: two hydrogen atoms bonded to one oxygen atom.", "H2O is a kind of metal."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun.", "Jupiter is closest."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have six legs."),
    (
        "What is the boiling point of water at sea level?",
        "Water boils at 100 °C (212 °F) at sea level.",
        "Water never boils.",
    ),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare wrote 'Romeo and Juliet'.", "Nobody knows, go away."),
    (
        "What is the largest ocean on Earth?",
        "The Pacific Ocean is the largest ocean on Earth.",
        "The largest ocean is the Baltic Sea.",
    ),
    ("Translate 'good morning' into French.", "'Good morning' in French is 'bonjour'.", "Bonsoir."),
    ("Give a synonym for 'happy'.", "A synonym for 'happy' is 'joyful'.", "Sad."),
    (
        "Write a Python function that returns the square of a number.",
        "def square(x):\n    return x * x",
        "Just multiply it yourself.",
    ),
    ("Name a primary colour.", "Red is a primary colour.", "Brown is the only primary colour."),
    ("What is the opposite of 'cold'?", "The opposite of 'cold' is 'hot'.", "The opposite of 'cold' is 'cool'."),
]


def arithmetic(rng: random.Random, n: int) -> list[tuple[str, str, str, int]]:
    tasks = []
    for _ in range(n):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        wrong = value + rng.choice([-3, -2, -1, 1, 2, 5])
        tasks.append((f"What is {a} {op} {b}?", f"{a} {op} {b} = {value}.", f"{a} {op} {b} = {wrong}.", value))
    return tasks


def main() -> None:
    rng = random.Random(1234)
    ASSETS.mkdir(parents=True, exist_ok=True)
    qa = [(q, good, bad) for q, good, bad in FACTS] + [(q, g, b) for q, g, b, _ in arithmetic(rng, 48)]
    rng.shuffle(qa)
    system = {"role": "system", "content": "You are a concise, helpful assistant."}
    with open(ASSETS / "sample_sft.jsonl", "w") as f:
        for i, (q, good, _) in enumerate(qa):
            messages = [system] if i % 3 == 0 else []
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": good}]
            if i % 4 == 0:  # some multi-turn conversations so assistant-only masking matters
                messages += [
                    {"role": "user", "content": "Thanks! Say it once more."},
                    {"role": "assistant", "content": good},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")
    with open(ASSETS / "sample_pairs.jsonl", "w") as f:
        for q, good, bad in qa:
            f.write(json.dumps({"prompt": q, "chosen": good, "rejected": bad}) + "\n")
    with open(ASSETS / "sample_prompts.jsonl", "w") as f:
        for q, _, _, value in arithmetic(random.Random(99), 64):
            f.write(json.dumps({"prompt": q, "answer": str(value)}) + "\n")
    print(f"wrote sample data to {ASSETS}")


if __name__ == "__main__":
    main()
