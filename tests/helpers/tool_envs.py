"""A TRL-style environment class (`GRPOTrainer(environment_factory=...)`) for the adapter tests, and a scripted
tool-calling policy for it (importable by env worker processes, which inherit the test path)."""

import json
import re


class GuessEnv:
    """Guess a secret number with the `guess` tool; `shout` always raises (its error goes back to the model)."""

    def reset(self, **row):
        self.target = int(row["target"])
        self.guesses = 0
        self.done = False
        return f" The number is between 1 and {int(row.get('high', 8))}."

    def guess(self, number: int) -> str:
        """Guess the secret number.

        Args:
            number: your guess
        """
        self.guesses += 1
        if number == self.target:
            self.done = True
            return "correct"
        return "higher" if number < self.target else "lower"

    def shout(self, word: str) -> str:
        """Shout a word.

        Args:
            word: the word
        """
        raise RuntimeError(f"no shouting: {word}")

    def get_reward(self) -> float:
        return 1.0 if self.done else 0.0


def guess_rows(targets, high: int = 8):
    return [
        {"prompt": [{"role": "user", "content": "Find the secret number."}], "target": t, "high": high}
        for t in targets
    ]


def tool_call_text(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def bisecting_policy(conversation: str) -> str:
    """Binary search over 1..8 from the tool responses seen so far; the guess is written as a string ("5") so that
    only the schema-typed parser makes it an int. The first turn also calls `shout` (an error the model sees)."""
    low, high = 1, 8
    guesses = [int(g) for g in re.findall(r'"number": "?(\d+)', conversation)]
    answers = re.findall(r"<tool_response>\n(\w+)", conversation)
    answers = [a for a in answers if a in ("higher", "lower", "correct")]
    for g, a in zip(guesses, answers):
        if a == "higher":
            low = g + 1
        elif a == "lower":
            high = g - 1
    call = tool_call_text("guess", {"number": str((low + high) // 2)})
    if not guesses:
        call = tool_call_text("shout", {"word": "hi"}) + "\n" + call
    return call
