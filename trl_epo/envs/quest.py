"""A long-horizon, sparse-reward variant of the toy env: collect several gems IN ORDER across many rooms, among
distractors, then finish at the hall's altar or at the east door. The setting of the EPO study (`benchmarks/study/`).

Rooms in a row (west to east). A task asks for 3 (train/IID) or 4 (OOD) coloured gems in a given order. Every room
may hold distractors: furniture and coloured *stones* (``red stone`` next to ``red gem``) that can be taken but are
useless. A gem taken out of order slips back ("take the red gem first": an invalid action that costs a turn). Two
task families:

* ``gems-altar``: collect the gems in order, bring them back to the hall (the west-most room), ``place gems``.
* ``gems-door``: collect the gems in order, go to the east-most room, ``open door``.

Every observation describes the room and says in which direction the next gem (or the goal) lies, so the current
observation is enough to act well (the paper's windowed prompts), but a good policy still needs >= 15 turns (train/IID layouts are drawn until the
shortest solution has 15-19 steps, OOD 21-24; the registry's turn limit is 28): a long horizon where every episode ends
with a binary outcome reward (1.0 on the solving turn, else 0). (task, variation, seed) fully determine an episode.
Pure Python and thread-safe (no shared state), so it runs in any `EnvPool` backend.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from .base import StepResult, TaskSpec, task_rows


ROOM_NAMES = [
    "hall",
    "kitchen",
    "study",
    "cellar",
    "attic",
    "garden",
    "library",
    "pantry",
    "gallery",
    "chapel",
    "armory",
    "vault",
]
COLOURS = ["red", "blue", "green", "yellow", "white"]
FURNITURE = ["lamp", "book", "chair", "rug", "vase", "clock"]
TASKS = ("gems-altar", "gems-door")
DIRECTIONS = {"east": 1, "west": -1}
SPLITS = ("train", "iid", "ood")
SOLUTION_RANGE = {"train": (15, 19), "iid": (15, 19), "ood": (21, 24)}  # shortest-solution steps


def layout_size(spec: TaskSpec) -> tuple[int, int]:
    """(rooms, gems) of a task: train/IID 6-8 rooms and 3 gems; OOD 9-10 rooms and 4 gems (never seen in training)."""
    if spec.split == "ood":
        return 9 + spec.variation % 2, 4
    return 6 + spec.variation % 3, 3


class QuestEnv:
    """The ordered gem quest (see the module docstring).

    Args:
        max_steps: the env's own move limit; the episode ends (not won) after this many steps.
        list_actions: return the admissible actions with every observation.
    """

    name = "quest"

    def __init__(self, max_steps: int = 60, list_actions: bool = True):
        self.max_steps = max_steps
        self.list_actions = list_actions
        self._spec: TaskSpec | None = None

    # ---- the protocol
    def reset(self, task: TaskSpec | Mapping[str, Any]) -> StepResult:
        spec = TaskSpec.from_row(task)
        if spec.task not in TASKS:
            raise ValueError(f"Unknown quest task {spec.task!r}; use one of {TASKS}.")
        if spec.split not in SPLITS:
            raise ValueError(f"Unknown quest split {spec.split!r}; use one of {SPLITS}.")
        self._spec = spec
        self.num_rooms, num_gems = layout_size(spec)
        rng = random.Random(f"quest/{spec.task}/{spec.variation}/{spec.seed}")
        for _ in range(1000):  # draw layouts until the shortest solution is long enough (a long horizon)
            self.order = [f"{c} gem" for c in rng.sample(COLOURS, num_gems)]
            self.gem_rooms = [rng.randrange(1, self.num_rooms) for _ in self.order]
            low, high = SOLUTION_RANGE[spec.split]
            if low <= solution_length(self.gem_rooms, self.num_rooms, spec.task) <= high:
                break
        self.objects: dict[int, list[str]] = {r: [] for r in range(self.num_rooms)}
        for gem, room in zip(self.order, self.gem_rooms):
            self.objects[room].append(gem)
        for r in range(self.num_rooms):
            if rng.random() < 0.7:
                self.objects[r].append(f"{rng.choice(COLOURS)} stone")
            if rng.random() < 0.4:
                self.objects[r].append(rng.choice(FURNITURE))
            rng.shuffle(self.objects[r])
        self.room = 0
        self.inventory: list[str] = []
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
        invalid, reward = False, 0.0
        if command in ("look", "look around"):
            text = self._describe()
        elif command.startswith("go "):
            target = self.room + DIRECTIONS.get(command[3:], 0)
            if command[3:] in DIRECTIONS and 0 <= target < self.num_rooms:
                self.room = target
                text = self._describe()
            else:
                text, invalid = "You cannot go that way.", True
        elif command.startswith("take "):
            thing = command[5:].removeprefix("the ")
            if thing not in self.objects[self.room]:
                text, invalid = f"There is no {thing} here.", True
            elif thing.endswith(" gem") and thing != self._next_gem():
                text, invalid = f"The {thing} slips from your hand: take the {self._next_gem()} first.", True
            else:
                self.objects[self.room].remove(thing)
                self.inventory.append(thing)
                text = f"You take the {thing}."
        elif command in ("place gems", "place the gems"):
            if self.room != 0 or self._spec.task != "gems-altar":
                text, invalid = "There is no altar here.", True
            elif self._next_gem() is not None:
                text = f"The altar stays dark: you still need the {self._next_gem()}."
            else:
                text, reward, self.won = "The gems glow on the altar. You win!", 1.0, True
        elif command in ("open door", "open the door"):
            if self.room != self.num_rooms - 1 or self._spec.task != "gems-door":
                text, invalid = "There is no door here.", True
            elif self._next_gem() is not None:
                text = f"The door is sealed: you still need the {self._next_gem()}."
            else:
                text, reward, self.won = "The gems unseal the door and it opens. You win!", 1.0, True
        else:
            text, invalid = "Nothing happens. That is not a command I know.", True
        if not self.won and not command.startswith(("look", "go ")) or (command.startswith("go ") and invalid):
            text += " " + self._describe()  # every observation says where the agent is and where to go next
        self.done = self.won or self.steps >= self.max_steps
        result = self._result(text, reward=reward)
        result.info["invalid_action"] = invalid
        return result

    def close(self) -> None:
        self._spec = None

    # ---- helpers
    def task_description(self) -> str:
        gems = ", then the ".join(self.order)
        goal = "bring them to the hall and place gems" if self._spec.task == "gems-altar" else "open the east door"
        return f"Take the {gems}, in this order; then {goal}."

    def admissible_actions(self) -> list[str]:
        actions = ["look"]
        if self.room < self.num_rooms - 1:
            actions.append("go east")
        if self.room > 0:
            actions.append("go west")
        actions += [f"take {thing}" for thing in self.objects[self.room]]
        if self._spec.task == "gems-altar" and self.room == 0:
            actions.append("place gems")
        if self._spec.task == "gems-door" and self.room == self.num_rooms - 1:
            actions.append("open door")
        return actions

    def _next_gem(self) -> str | None:
        return self.order[len([t for t in self.inventory if t.endswith(" gem")])] if not self._all_gems() else None

    def _all_gems(self) -> bool:
        return all(g in self.inventory for g in self.order)

    def _hint(self) -> str:
        gem = self._next_gem()
        if gem is not None:
            target, what = self.gem_rooms[self.order.index(gem)], f"The {gem}"
        elif self._spec.task == "gems-altar":
            target, what = 0, "The altar"
        else:
            target, what = self.num_rooms - 1, "The door"
        where = "here" if target == self.room else ("east" if target > self.room else "west")
        return f"{what} is {where}."

    def _describe(self) -> str:
        things = self.objects[self.room]
        text = f"Room {self.room + 1} of {self.num_rooms}, the {ROOM_NAMES[self.room]}."
        text += " You see: " + (", ".join(things) if things else "nothing") + "."
        return text + " " + self._hint()

    def _result(self, observation: str, reward: float) -> StepResult:
        return StepResult(
            observation=observation,
            reward=reward,
            done=self.done,
            won=self.won,
            admissible_actions=self.admissible_actions() if self.list_actions else None,
            info={"score": 100.0 if self.won else 0.0},
        )


def solution_length(gem_rooms: list[int], num_rooms: int, task: str) -> int:
    """Steps of the shortest solution: walk to each gem in order and take it, then walk to the goal and act."""
    position, steps = 0, 0
    for room in gem_rooms:
        steps += abs(room - position) + 1
        position = room
    goal = 0 if task == "gems-altar" else num_rooms - 1
    return steps + abs(goal - position) + 1


def expert_actions(task: TaskSpec | Mapping[str, Any]) -> list[str]:
    """A shortest solving action sequence for a task (the gold path)."""
    env = QuestEnv()
    env.reset(task)
    actions, position = [], 0
    for gem, room in zip(env.order, env.gem_rooms):
        actions += ["go east" if room > position else "go west"] * abs(room - position) + [f"take {gem}"]
        position = room
    goal = 0 if env._spec.task == "gems-altar" else env.num_rooms - 1
    actions += ["go east" if goal > position else "go west"] * abs(goal - position)
    return actions + ["place gems" if env._spec.task == "gems-altar" else "open door"]


def make_tasks(split: str = "train", num_tasks: int = 16, seed: int = 0) -> list[TaskSpec]:
    """Task specs of a split. train and iid share the layout sizes (variations 0-5) with disjoint seeds; ood has more
    rooms and one gem more, never seen in training."""
    if split not in SPLITS:
        raise ValueError(f"Unknown quest split {split!r}; use one of {SPLITS}.")
    seed_base = {"train": 0, "iid": 100_000, "ood": 200_000}[split]
    rng = random.Random(f"quest/{split}/{seed}")
    return [
        TaskSpec(
            env="quest",
            task=TASKS[i % 2],
            variation=rng.randrange(6),
            seed=seed_base + rng.randrange(100_000),
            split=split,
        )
        for i in range(num_tasks)
    ]


def make_dataset(split: str = "train", num_tasks: int = 16, seed: int = 0):
    """A `datasets.Dataset` of quest tasks (one row per task; TRL repeats each row `num_generations` times)."""
    from datasets import Dataset

    return Dataset.from_dict(task_rows(make_tasks(split, num_tasks, seed)))
