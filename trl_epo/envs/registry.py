"""Environments by name, with their defaults: ``get_env("sciworld").make_tasks("ood")``.

An `EnvSpec` is everything the rest of the package may know about an environment: the module and class that
implement it (imported only when asked for, so a missing optional dependency only matters for the env that needs it),
its split names and aliases, the pip extra that installs it, and its defaults (turns per episode, prompt style). No
other module knows an env by name: the trainer, evaluation and the scripts read these entries.

The module must provide the env class and ``make_tasks(split, ...) -> list[TaskSpec]`` (and usually ``make_dataset``).
Register your own with `register_env`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import import_module
from types import MappingProxyType
from typing import Any

from .base import TaskSpec
from .prompting import PromptStyle


@dataclass(frozen=True)
class EnvSpec:
    """A registered environment and its defaults.

    Attributes:
        name: the canonical name (the `env` column of its task rows).
        module / env_class: where the env is implemented.
        splits: the main split names (the module may accept more, e.g. the aliases it documents).
        aliases: other names that resolve to this env.
        extra: the pip extra that installs its dependencies (named in import errors).
        max_turns: default turns per episode (paper: 30 ScienceWorld, 50 ALFWorld).
        prompt: `PromptStyle` fields that differ from the generic style (e.g. the env's own instruction).
    """

    name: str
    module: str
    env_class: str
    splits: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    extra: str | None = None
    max_turns: int = 30
    prompt: Mapping[str, Any] = field(default_factory=dict)

    def load(self):
        try:
            return import_module(self.module)
        except ImportError as error:
            hint = f' Install it with `pip install "trl-epo[{self.extra}]"`.' if self.extra else ""
            raise ImportError(f"The {self.name!r} environment needs a missing package: {error}.{hint}") from error

    def factory(self, **kwargs):
        """A picklable zero-argument factory (for `EnvPool`), binding constructor keyword arguments."""
        cls = getattr(self.load(), self.env_class)
        return functools.partial(cls, **kwargs) if kwargs else cls

    def make_tasks(self, split: str, **kwargs: Any) -> list[TaskSpec]:
        """The env module's `make_tasks` (it validates the split name and knows its aliases)."""
        return self.load().make_tasks(split, **kwargs)

    def make_dataset(self, split: str, **kwargs: Any):
        return self.load().make_dataset(split, **kwargs)

    def prompt_style(self, **overrides: Any) -> PromptStyle:
        """This env's prompt style; `overrides` whose value is None keep the env's default."""
        settings = dict(self.prompt)
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return PromptStyle(**settings)


SCIWORLD_INSTRUCTION = (
    "You are an agent in ScienceWorld, a text-based science laboratory. Read the task, then act in the world "
    "one command at a time to complete it. Commands follow the action templates shown with the task "
    "(replace OBJ with the name of an object you can see, e.g. 'open door to kitchen', 'pick up thermometer', "
    "'focus on substance in metal pot'). 'focus on OBJ' is a commitment: focus only on the object the task asks "
    "about, since focusing on the wrong one fails the task. If the game asks you to choose between numbered options, "
    "answer with the number. Each turn, think briefly, then give exactly one command inside {example}."
)

_ENVS: dict[str, EnvSpec] = {}


def register_env(spec: EnvSpec) -> EnvSpec:
    """Add (or replace) an environment; its name and aliases must not belong to another env."""
    for key in (spec.name, *spec.aliases):
        owner = _resolve(key)
        if owner is not None and owner.name != spec.name:
            raise ValueError(f"{key!r} already names the {owner.name!r} environment; choose another name.")
    _ENVS[spec.name] = spec
    return spec


def _resolve(name: str) -> EnvSpec | None:
    key = name.lower()
    for spec in _ENVS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    return None


def find_env(name: str | None) -> EnvSpec | None:
    """The registered env called `name` (or one of its aliases), or None."""
    return _resolve(name) if name else None


def get_env(name: str) -> EnvSpec:
    """The registered env called `name` (or one of its aliases); a clear error otherwise."""
    spec = find_env(name)
    if spec is None:
        raise ValueError(f"Unknown environment {name!r}; known: {sorted(_ENVS)} (add yours with register_env).")
    return spec


def registered_envs() -> Mapping[str, EnvSpec]:
    return MappingProxyType(_ENVS)


register_env(EnvSpec("toy", "trl_epo.envs.toy", "ToyEnv", ("train", "iid", "ood"), max_turns=15))
register_env(EnvSpec("quest", "trl_epo.envs.quest", "QuestEnv", ("train", "iid", "ood"), max_turns=28))
register_env(
    EnvSpec(
        "sciworld",
        "trl_epo.envs.sciworld",
        "ScienceWorldEnv",
        ("train", "iid", "ood", "held_out_types", "train_seen_types"),
        aliases=("scienceworld",),
        extra="sciworld",
        max_turns=30,
        prompt={"instruction": SCIWORLD_INSTRUCTION},
    )
)
register_env(
    EnvSpec(
        "alfworld", "trl_epo.envs.alfworld", "AlfWorldEnv", ("train", "iid", "ood"), extra="alfworld", max_turns=50
    )
)
