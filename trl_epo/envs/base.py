"""The text-environment protocol, task specs and action parsing (prompts: `trl_epo.envs.prompting`).

This module is light on purpose (standard library only): environment worker processes import it without importing
torch, transformers or TRL.

An environment is anything with

    reset(task) -> StepResult        # start an episode for a task (a TaskSpec or a dataset row dict)
    step(action: str) -> StepResult  # apply one action (the text inside <action>...</action>)
    close() -> None                  # free resources (JVMs, files); safe to call twice

Environments treat actions as data: they never `eval`, `exec` or shell out on model text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class StepResult:
    """What an environment returns from `reset` and `step`.

    Attributes:
        observation: the text the agent sees next.
        reward: the reward of this step (most benchmark envs: 0 until the end).
        done: the episode is over (won, lost or the env's own move limit).
        won: the task is solved (the env's own goal check).
        admissible_actions: the actions the env accepts now, when it can list them (None otherwise).
        info: anything else. Conventions: `task_description` (str, set by `reset`), `score` (float, env score on a 0-100 scale),
            `invalid_action` (bool, the env did not understand the action), `env_error` (str, set by the pool when
            the env raised, hung or its worker died: the episode counts as failed).
    """

    observation: str
    reward: float = 0.0
    done: bool = False
    won: bool = False
    admissible_actions: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def env_error(self) -> str | None:
        return self.info.get("env_error")

    @classmethod
    def failure(cls, message: str) -> StepResult:
        """The result the pool reports for an env that raised, hung or died: a finished, failed episode."""
        return cls(observation="", reward=0.0, done=True, won=False, info={"env_error": message})


@runtime_checkable
class TextEnv(Protocol):
    """The protocol every environment implements (see the module docstring)."""

    def reset(self, task: TaskSpec | Mapping[str, Any]) -> StepResult: ...

    def step(self, action: str) -> StepResult: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TaskSpec:
    """One task = one dataset row: which env, which task, which variation and seed, which split.

    `task` is the env's task identifier (a ScienceWorld task name, an ALFWorld game file, a toy task name).
    `extra` holds env-specific fields (e.g. a simplification preset); it must be JSON-serialisable.
    """

    env: str
    task: str
    variation: int = 0
    seed: int = 0
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("env", "task", "variation", "seed", "split")

    @classmethod
    def from_row(cls, row: TaskSpec | Mapping[str, Any]) -> TaskSpec:
        if isinstance(row, TaskSpec):
            return row
        missing = [name for name in ("env", "task") if name not in row]
        if missing:
            raise ValueError(
                f"A task row needs the columns {list(cls.FIELDS)}; this one lacks {missing}. Build datasets with the "
                "env module's dataset functions (e.g. trl_epo.envs.toy.make_dataset)."
            )
        extra = dict(row.get("extra") or {})
        return cls(
            env=str(row["env"]),
            task=str(row["task"]),
            variation=int(row.get("variation", 0) or 0),
            seed=int(row.get("seed", 0) or 0),
            split=str(row.get("split", "train") or "train"),
            extra=extra,
        )

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def task_rows(tasks: Sequence[TaskSpec], prompt_of=None) -> dict[str, list]:
    """Columns for `datasets.Dataset.from_dict`: the task fields plus TRL's `prompt` column (a one-message
    conversation naming the task; the real prompt is built by the rollout from the env's first observation)."""
    columns: dict[str, list] = {name: [] for name in (*TaskSpec.FIELDS, "extra", "prompt")}
    for spec in tasks:
        row = spec.to_row()
        for name in (*TaskSpec.FIELDS, "extra"):
            columns[name].append(row[name])
        text = prompt_of(spec) if prompt_of else f"{spec.env}: {spec.task} (variation {spec.variation})"
        columns["prompt"].append([{"role": "user", "content": text}])
    return columns


# --------------------------------------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------------------------------------

MAX_ACTION_CHARS = 300


@dataclass(frozen=True)
class ActionFormat:
    """How the agent must write its action: inside `<tag>...</tag>`. The last such span counts.

    An answer with no complete span, an empty span, or a span longer than `max_chars` is invalid.
    """

    tag: str = "action"
    max_chars: int = MAX_ACTION_CHARS

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", self.tag):
            raise ValueError(f"action tag must be a plain XML-like name, got {self.tag!r}.")

    @property
    def pattern(self) -> re.Pattern:
        return re.compile(rf"<{self.tag}>(.*?)</{self.tag}>", re.DOTALL | re.IGNORECASE)

    def parse(self, text: str) -> str | None:
        """The action inside the last `<tag>...</tag>` span, whitespace-normalised; None when invalid."""
        matches = self.pattern.findall(text or "")
        if not matches:
            return None
        action = " ".join(matches[-1].split())
        if not action or len(action) > self.max_chars:
            return None
        return action

    def example(self, action: str = "look around") -> str:
        return f"<{self.tag}>{action}</{self.tag}>"


def parse_action(text: str, tag: str = "action") -> str | None:
    """The action inside the last `<tag>...</tag>` of `text` (None if absent, empty or too long)."""
    return ActionFormat(tag).parse(text)
