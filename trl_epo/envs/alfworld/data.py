"""Where the ALFWorld games are and which tasks a split has: data roots, finding the solvable games of a split, and
`make_tasks` / `make_dataset`.

Games are read from the official ``json_2.1.1`` layout::

    <data root>/json_2.1.1/<split>/<task-type>-<object>-<mrecep>-<parent>-<scene>/<trial>/
        game.tw-pddl  traj_data.json  initial_state.pddl

with ``<split>`` = ``train`` (train), ``valid_seen`` (IID evaluation) and ``valid_unseen`` (OOD evaluation). The data
root is the ``data_root`` argument, else ``$ALFWORLD_DATA`` (where ``alfworld-download`` puts the official games).
Without internet, ``trl-epo-alfworld-games --out DIR`` writes games of the same layout (`game_writer`). Dataset rows
store the game path *relative to the data root*, so a dataset works on any machine that has the games.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable

from ..base import TaskSpec, task_rows
from .pddl import GAME_FILE, TASK_TYPES, TRAJ_FILE, canonical_task_type


ENV_NAME = "alfworld"  # the `env` column of the task rows (the registry entry's name)
DATA_DIR = "json_2.1.1"
# Split names -> directories of the official layout. train / IID / OOD as in the paper; valid_train (a subset of the
# official train split, shipped with the test data) is accepted by its directory name.
SPLIT_DIRS = {
    "train": "train",
    "iid": "valid_seen",
    "valid_seen": "valid_seen",
    "ood": "valid_unseen",
    "valid_unseen": "valid_unseen",
    "valid_train": "valid_train",
}
SPLIT_NAMES = {"train": "train", "valid_seen": "iid", "valid_unseen": "ood", "valid_train": "valid_train"}


def resolve_data_root(data_root: str | os.PathLike | None = None) -> str:
    """The directory holding the split directories (``train``, ``valid_seen``, ``valid_unseen``).

    ``data_root`` (else ``$ALFWORLD_DATA``) may be that directory itself or its parent holding ``json_2.1.1``.
    """
    root = os.fspath(data_root) if data_root is not None else os.environ.get("ALFWORLD_DATA")
    if not root:
        raise FileNotFoundError(
            "No ALFWorld data root: pass data_root=... or set ALFWORLD_DATA to the folder holding json_2.1.1/ "
            "(`alfworld-download` fills it; offline, generate games with `trl-epo-alfworld-games --out DIR`)."
        )
    root = os.path.abspath(os.path.expanduser(root))
    for candidate in (os.path.join(root, DATA_DIR), root):
        if os.path.isdir(candidate) and any(
            os.path.isdir(os.path.join(candidate, d)) for d in set(SPLIT_DIRS.values())
        ):
            return candidate
    raise FileNotFoundError(
        f"No ALFWorld games under {root}: expected {root}/{DATA_DIR}/<split>/... with <split> in "
        f"{sorted(set(SPLIT_DIRS.values()))}. Run `alfworld-download` (needs internet) or generate games offline with "
        f"`trl-epo-alfworld-games --out {root}`."
    )


def split_dir(split: str) -> str:
    if split not in SPLIT_DIRS:
        raise ValueError(f"Unknown ALFWorld split {split!r}; use one of {sorted(SPLIT_DIRS)}.")
    return SPLIT_DIRS[split]


def find_games(split: str = "train", data_root=None, task_types: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """``[(relative game path, task type), ...]`` of the solvable games of a split, sorted by path.

    Like alfworld's own loader: games with a movable receptacle or a sliced object are left out (their task types are
    not among the six), as are games without a ``game.tw-pddl`` or marked unsolvable.
    """
    root = resolve_data_root(data_root)
    directory = split_dir(split)
    base = os.path.join(root, directory)
    if not os.path.isdir(base):
        present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise FileNotFoundError(f"No {directory}/ under {root} (it has: {present}).")
    wanted = {canonical_task_type(t) for t in task_types} if task_types else set(TASK_TYPES)
    games = []
    for task_dir in sorted(os.listdir(base)):
        if "movable" in task_dir or "Sliced" in task_dir:
            continue
        task_type = task_dir.split("-", 1)[0]
        if task_type not in wanted:
            continue
        task_path = os.path.join(base, task_dir)
        if not os.path.isdir(task_path):
            continue
        for trial in sorted(os.listdir(task_path)):
            game = os.path.join(task_path, trial, GAME_FILE)
            if not os.path.isfile(game) or not os.path.isfile(os.path.join(task_path, trial, TRAJ_FILE)):
                continue
            if not _is_solvable(game):
                continue
            games.append((os.path.relpath(game, root), task_type))
    return games


_SOLVABLE = re.compile(r'"solvable"\s*:\s*(true|false)')


def _is_solvable(game: str) -> bool:
    """The game file's ``solvable`` flag (read from the file's tail, where alfworld writes it; else parsed)."""
    with open(game, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4096))
        tail = f.read().decode("utf-8", errors="ignore")
    match = _SOLVABLE.findall(tail)
    if match:
        return match[-1] == "true"
    with open(game) as f:
        return bool(json.load(f).get("solvable", False))


def make_tasks(
    split: str = "train",
    data_root=None,
    task_types: Iterable[str] | None = None,
    num_tasks: int | None = None,
    seed: int = 0,
) -> list[TaskSpec]:
    """Task specs of a split: ``train``, ``iid`` (= ``valid_seen``) or ``ood`` (= ``valid_unseen``).

    Args:
        split: the split name (``valid_seen``/``valid_unseen``/``valid_train`` are accepted too).
        data_root: the data root (default ``$ALFWORLD_DATA``); see `resolve_data_root`.
        task_types: keep only these task types (official or short names).
        num_tasks: a random subset of this many games (drawn with `seed`); all games when None.
        seed: the seed of that subset.

    Each spec's ``task`` is the game file path relative to the data root; ``extra`` records the task type and scene.
    """
    games = find_games(split, data_root, task_types)
    if not games:
        raise FileNotFoundError(f"No solvable ALFWorld games of types {task_types or 'any'} in split {split!r}.")
    if num_tasks is not None and num_tasks < len(games):
        picked = sorted(random.Random(f"alfworld/{split}/{seed}").sample(range(len(games)), num_tasks))
        games = [games[i] for i in picked]
    name = SPLIT_NAMES[split_dir(split)]
    return [
        TaskSpec(env=ENV_NAME, task=path, split=name, extra={"task_type": task_type, "scene": _scene_of(path)})
        for path, task_type in games
    ]


def _scene_of(path: str) -> str:
    """``FloorPlan<n>`` from a game path (``.../<type>-<obj>-<mrecep>-<parent>-<n>/<trial>/game.tw-pddl``)."""
    task_dir = os.path.basename(os.path.dirname(os.path.dirname(path)))
    return f"FloorPlan{task_dir.rsplit('-', 1)[-1]}"


def _prompt_of(spec: TaskSpec) -> str:
    return f"ALFWorld {spec.extra.get('task_type', '')}: {spec.task}"


def make_dataset(
    split: str = "train",
    data_root=None,
    task_types: Iterable[str] | None = None,
    num_tasks: int | None = None,
    seed: int = 0,
):
    """A `datasets.Dataset` with one row per game (see `make_tasks`), plus a ``task_type`` column."""
    from datasets import Dataset

    tasks = make_tasks(split, data_root, task_types, num_tasks, seed)
    columns = task_rows(tasks, prompt_of=_prompt_of)
    columns["task_type"] = [spec.extra["task_type"] for spec in tasks]
    return Dataset.from_dict(columns)
