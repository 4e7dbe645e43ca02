"""A tiny deterministic multi-turn text environment: the example of the `TextEnv` protocol and the workhorse of fast
tests and learning benchmarks.

Rooms in a row (west to east). Two task families:

* ``open-door``: find the key somewhere, take it, walk to the east-most room and open the locked door.
* ``fetch-coin``: find the coin, take it, bring it back to the first room and drop it there.

Reward is sparse: 1.0 on the turn the task is solved, 0 otherwise. The number of rooms comes from the variation
(2 + variation % 3 for the train/IID splits, 5-6 for the OOD split), the placement of the key/coin and of distractor
objects from the seed; (task, variation, seed) fully determine an episode. Pure Python and thread-safe (no shared
state), so it runs in any `EnvPool` backend.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from .base import StepResult, TaskSpec, task_rows


ROOM_NAMES = ["hall", "kitchen", "study", "cellar", "attic", "garden", "library", "pantry"]
DISTRACTORS = ["lamp", "book", "chair", "rug", "vase", "clock"]
TASKS = ("open-door", "fetch-coin")
DIRECTIONS = {"east": 1, "west": -1}


class ToyEnv:
    """The toy key/door and coin environment (see the module docstring).

    Args:
        max_steps: the env's own move limit; the episode ends (not won) after this many steps.
        list_actions: return the admissible actions with every observation.
    """

    name = "toy"

    def __init__(self, max_steps: int = 50, list_actions: bool = True):
        self.max_steps = max_steps
        self.list_actions = list_actions
        self._spec: TaskSpec | None = None

    # ---- the protocol
    def reset(self, task: TaskSpec | Mapping[str, Any]) -> StepResult:
        spec = TaskSpec.from_row(task)
        if spec.task not in TASKS:
            raise ValueError(f"Unknown toy task {spec.task!r}; use one of {TASKS}.")
        self._spec = spec
        rng = random.Random(f"{spec.task}/{spec.variation}/{spec.seed}")
        self.num_rooms = num_rooms(spec)
        self.item = "key" if spec.task == "open-door" else "coin"
        self.item_room = rng.randrange(1, self.num_rooms) if self.num_rooms > 1 else 0
        self.objects = {r: [] for r in range(self.num_rooms)}
        self.objects[self.item_room].append(self.item)
        for r in range(self.num_rooms):
            if rng.random() < 0.6:
                self.objects[r].append(rng.choice(DISTRACTORS))
        self.room = 0
        self.inventory: list[str] = []
        self.door_open = False
        self.steps = 0
        self.done = False
        self.won = False
        result = self._result(self._describe(), reward=0.0)
        result.info["task_description"] = self.task_description()
        return result

    def step(self, action: str) -> StepResult:
        if self._spec is None:
            raise RuntimeError("Call reset(task) before step(action).")
        if self.done:
            return self._result("The episode is over.", reward=0.0)
        self.steps += 1
        command = " ".join(str(action).lower().split())
        invalid = False
        reward = 0.0
        if command in ("look", "look around"):
            text = self._describe()
        elif command in ("inventory", "i"):
            text = "You carry: " + (", ".join(self.inventory) if self.inventory else "nothing") + "."
        elif command.startswith("go "):
            direction = command[3:]
            target = self.room + DIRECTIONS.get(direction, 0)
            if direction in DIRECTIONS and 0 <= target < self.num_rooms:
                self.room = target
                text = self._describe()
            else:
                text, invalid = "You cannot go that way.", True
        elif command.startswith("take "):
            thing = command[5:].removeprefix("the ")
            if thing in self.objects[self.room]:
                self.objects[self.room].remove(thing)
                self.inventory.append(thing)
                text = f"You take the {thing}."
            else:
                text, invalid = f"There is no {thing} here.", True
        elif command.startswith("drop "):
            thing = command[5:].removeprefix("the ")
            if thing in self.inventory:
                self.inventory.remove(thing)
                self.objects[self.room].append(thing)
                text = f"You drop the {thing}."
                if self._spec.task == "fetch-coin" and thing == "coin" and self.room == 0:
                    text += " The coin is back where it belongs. You win!"
                    reward, self.won = 1.0, True
            else:
                text, invalid = f"You do not carry a {thing}.", True
        elif command in ("open door", "open the door"):
            if self.room != self.num_rooms - 1:
                text, invalid = "There is no door here.", True
            elif "key" not in self.inventory:
                text = "The door is locked. You need a key."
            else:
                self.door_open = True
                text = "You unlock the door and open it. You win!"
                reward, self.won = 1.0, self._spec.task == "open-door"
        else:
            text, invalid = "Nothing happens. That is not a command I know.", True
        self.done = self.won or self.steps >= self.max_steps
        result = self._result(text, reward=reward)
        result.info["invalid_action"] = invalid
        return result

    def close(self) -> None:
        self._spec = None

    # ---- helpers
    def task_description(self) -> str:
        if self.item == "key":
            return "Find the key, take it, go to the east-most room and open the door."
        return "Find the coin, take it, bring it back to the hall (the west-most room) and drop it there."

    def admissible_actions(self) -> list[str]:
        actions = ["look", "inventory"]
        if self.room < self.num_rooms - 1:
            actions.append("go east")
        if self.room > 0:
            actions.append("go west")
        actions += [f"take {thing}" for thing in self.objects[self.room]]
        actions += [f"drop {thing}" for thing in self.inventory]
        if self.room == self.num_rooms - 1:
            actions.append("open door")
        return actions

    def _describe(self) -> str:
        exits = [d for d, delta in DIRECTIONS.items() if 0 <= self.room + delta < self.num_rooms]
        things = self.objects[self.room]
        text = f"You are in the {ROOM_NAMES[self.room]} (room {self.room + 1} of {self.num_rooms})."
        text += " Exits: " + (", ".join(exits) if exits else "none") + "."
        text += " You see: " + (", ".join(f"a {t}" for t in things) if things else "nothing special") + "."
        if self.room == self.num_rooms - 1:
            text += " There is a door here." if not self.door_open else " The door is open."
        return text

    def _result(self, observation: str, reward: float) -> StepResult:
        return StepResult(
            observation=observation,
            reward=reward,
            done=self.done,
            won=self.won,
            admissible_actions=self.admissible_actions() if self.list_actions else None,
            info={"score": 100.0 if self.won else 0.0},
        )


def num_rooms(spec: TaskSpec) -> int:
    if spec.split == "ood":
        return 5 + spec.variation % 2
    return 2 + spec.variation % 3


def expert_actions(task: TaskSpec | Mapping[str, Any]) -> list[str]:
    """A shortest solving action sequence for a task (the gold path), computed by replaying the env."""
    spec = TaskSpec.from_row(task)
    env = ToyEnv()
    env.reset(spec)
    actions = ["go east"] * env.item_room + [f"take {env.item}"]
    if spec.task == "open-door":
        actions += ["go east"] * (env.num_rooms - 1 - env.item_room) + ["open door"]
    else:
        actions += ["go west"] * env.item_room + ["drop coin"]
    return actions


def make_tasks(split: str = "train", num_tasks: int = 16, seed: int = 0) -> list[TaskSpec]:
    """Task specs of a split. train and iid share the layouts (variations 0-5) with disjoint seeds; ood uses 5-6
    rooms, never seen in training."""
    if split not in ("train", "iid", "ood"):
        raise ValueError(f"Unknown toy split {split!r}; use 'train', 'iid' or 'ood'.")
    seed_base = {"train": 0, "iid": 100_000, "ood": 200_000}[split]
    rng = random.Random(f"toy/{split}/{seed}")
    return [
        TaskSpec(
            env="toy",
            task=TASKS[i % 2],
            variation=rng.randrange(6),
            seed=seed_base + rng.randrange(100_000),
            split=split,
        )
        for i in range(num_tasks)
    ]


def make_dataset(split: str = "train", num_tasks: int = 16, seed: int = 0):
    """A `datasets.Dataset` of toy tasks (one row per task; TRL repeats each row `num_generations` times)."""
    from datasets import Dataset

    return Dataset.from_dict(task_rows(make_tasks(split, num_tasks, seed)))
