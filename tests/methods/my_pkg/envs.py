"""A research environment: the model guesses a secret number and is told "higher" or "lower" after each guess.

agent: {environment: my_pkg.envs:GuessTheNumber, environment_args: {low: 1, high: 20}, max_turns: 5}
"""

from __future__ import annotations

import random
import re

from rlft.rl.environment import StepResult


class GuessTheNumber:
    tools: list = []  # no tools: the environment answers in user turns
    observation_role = "user"

    def __init__(self, low: int = 1, high: int = 20) -> None:
        if low >= high:
            raise ValueError(f"GuessTheNumber needs low < high, got {low} and {high}")
        self.low, self.high = low, high

    def reset(self, row):
        # the row may fix the secret (held-out tasks); otherwise each episode draws one
        self.secret = int(row.get("secret") or random.randint(self.low, self.high))
        task = f"Guess my number between {self.low} and {self.high}. Reply with a number."
        return [{"role": "user", "content": task}]

    def step(self, action: str) -> StepResult:
        numbers = re.findall(r"-?\d+", action)
        if not numbers:
            return StepResult("Reply with a number.", reward=-0.1)
        guess = int(numbers[-1])
        if guess == self.secret:
            return StepResult(reward=1.0, done=True, info={"guess": guess})
        return StepResult("higher" if guess < self.secret else "lower", info={"guess": guess})
