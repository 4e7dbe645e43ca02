"""Environments by name, for scripts and evaluation: ``get_env("sciworld").make_tasks("ood")``.

Each entry names the module that implements the env; the module must provide the env class and
``make_tasks(split, ...) -> list[TaskSpec]`` (and usually ``make_dataset``). Modules are imported only when asked for,
so a missing optional dependency (scienceworld, alfworld) only matters for the env that needs it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from .base import TaskSpec


@dataclass(frozen=True)
class EnvEntry:
    name: str
    module: str
    env_class: str
    splits: tuple[str, ...]  # the main split names (the module may accept more, e.g. aliases)
    extra: str | None = None  # the pip extra that installs its dependencies

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


ENVS: dict[str, EnvEntry] = {
    "toy": EnvEntry("toy", "trl_epo.envs.toy", "ToyEnv", ("train", "iid", "ood")),
    "sciworld": EnvEntry(
        "sciworld",
        "trl_epo.envs.sciworld",
        "ScienceWorldEnv",
        ("train", "iid", "ood", "held_out_types", "train_seen_types"),
        "sciworld",
    ),
    "alfworld": EnvEntry("alfworld", "trl_epo.envs.alfworld", "AlfWorldEnv", ("train", "iid", "ood"), "alfworld"),
}


def get_env(name: str) -> EnvEntry:
    key = name.lower().replace("scienceworld", "sciworld")
    if key not in ENVS:
        raise ValueError(f"Unknown environment {name!r}; known: {sorted(ENVS)}.")
    return ENVS[key]
