"""ScienceWorld's tasks and the paper's splits: task types, (task, variation) pairs per split, `TaskSpec`s, datasets.

The splits come from the simulator's own train/dev/test variation API (see `variation_table`), so they are exactly
the package's; which task types each split covers follows the paper's code.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Sequence

from scienceworld.constants import ID2TASK, JAR_PATH
from scienceworld.utils import infer_task
from scienceworld.version import __version__ as SCIENCEWORLD_VERSION

from ..base import TaskSpec, task_rows
from .jvm import ScienceWorldJVM


ENV_NAME = "sciworld"  # the `env` column of the task rows (the registry entry's name)
DEFAULT_SIMPLIFICATION = "easy"

# The 30 task types, by their simulator names (the order of the simulator's `getTaskNames`, which the paper's code
# indexes).
ALL_TASKS: tuple[str, ...] = tuple(sorted(infer_task(name) for name in ID2TASK.values()))
# The paper's code trains and evaluates on every task type but this one.
EXCLUDED_TASKS: tuple[str, ...] = ("use-thermometer",)
PAPER_TASKS: tuple[str, ...] = tuple(t for t in ALL_TASKS if t not in EXCLUDED_TASKS)
# The stricter "held-out task types" split of the paper's code (its `L2` split): whole task types never seen in
# training, one per topic family, mostly the "unknown"/harder variant. Their test variations give 549 (task,
# variation) pairs; the 19 other types' train variations (2242 pairs) are the matching training set.
HELD_OUT_TASK_TYPES: tuple[str, ...] = (
    "change-the-state-of-matter-of",
    "chemistry-mix-paint-tertiary-color",
    "find-plant",
    "grow-plant",
    "identify-life-stages-2",
    "inclined-plane-friction-unnamed-surfaces",
    "lifespan-longest-lived-then-shortest-lived",
    "measure-melting-point-unknown-substance",
    "mendelian-genetics-unknown-plant",
    "test-conductivity-of-unknown-substances",
)
SEEN_TASK_TYPES: tuple[str, ...] = tuple(t for t in PAPER_TASKS if t not in HELD_OUT_TASK_TYPES)

# split name -> (task types, which package variation list)
SPLITS: dict[str, tuple[tuple[str, ...], str]] = {
    "train": (PAPER_TASKS, "train"),  # 3322 pairs
    "iid": (PAPER_TASKS, "dev"),  # 1661 pairs (the paper's IID / L0 evaluation)
    "ood": (PAPER_TASKS, "test"),  # 1684 pairs (the paper's OOD / L1 evaluation)
    "held_out_types": (HELD_OUT_TASK_TYPES, "test"),  # 549 pairs (L2 evaluation)
    "train_seen_types": (SEEN_TASK_TYPES, "train"),  # 2242 pairs (L2 training set)
}
SPLIT_ALIASES = {
    "dev": "iid",
    "test": "ood",
    "l0": "iid",
    "l1": "ood",
    "l2": "held_out_types",
    "heldout": "held_out_types",
    "held_out": "held_out_types",
}


def _cache_dir() -> str:
    base = os.environ.get("TRL_EPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "trl_epo"
    )
    return base


def _table_path() -> str:
    jar_size = os.path.getsize(JAR_PATH)
    return os.path.join(_cache_dir(), f"sciworld-{SCIENCEWORLD_VERSION}-{jar_size}-variations.json")


_VARIATION_TABLE: dict[str, dict[str, list[int]]] | None = None


def query_variation_table(jvm: ScienceWorldJVM | None = None) -> dict[str, dict[str, list[int]]]:
    """Ask the simulator for every task's train/dev/test variations (the package's split API)."""
    own = jvm is None
    jvm = jvm or ScienceWorldJVM()
    try:
        server = jvm.server
        table = {}
        for name in list(server.getTaskNames()):
            server.load(name, 0, "", False)
            table[str(name)] = {
                "train": [int(v) for v in server.getVariationsTrain()],
                "dev": [int(v) for v in server.getVariationsDev()],
                "test": [int(v) for v in server.getVariationsTest()],
            }
        return table
    finally:
        if own:
            jvm.close()


def variation_table(refresh: bool = False) -> dict[str, dict[str, list[int]]]:
    """Every task's ``{"train", "dev", "test"}`` variation lists, from the simulator's split API.

    Asking the simulator needs a JVM (~5 s), so the table is cached in memory and on disk (``$TRL_EPO_CACHE`` or
    ``~/.cache/trl_epo``, keyed by the scienceworld version and jar). `refresh=True` asks the simulator again.
    """
    global _VARIATION_TABLE
    if _VARIATION_TABLE is not None and not refresh:
        return _VARIATION_TABLE
    path = _table_path()
    table = None
    if not refresh and os.path.exists(path):
        try:
            with open(path) as f:
                table = json.load(f)
            if set(table) != set(ALL_TASKS):
                table = None
        except (OSError, ValueError):
            table = None
    if table is None:
        table = query_variation_table()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(table, f)
            os.replace(tmp, path)
        except OSError:  # a read-only home: keep it in memory only
            pass
    _VARIATION_TABLE = table
    return table


def split_pairs(split: str) -> list[tuple[str, int]]:
    """All (task, variation) pairs of a split, in task then variation order."""
    name = SPLIT_ALIASES.get(split.lower(), split.lower())
    if name not in SPLITS:
        raise ValueError(
            f"Unknown ScienceWorld split {split!r}; use one of {sorted(SPLITS)} (aliases: {SPLIT_ALIASES})."
        )
    tasks, which = SPLITS[name]
    table = variation_table()
    return [(task, variation) for task in tasks for variation in table[task][which]]


def make_tasks(
    split: str = "train",
    num_tasks: int | None = None,
    seed: int = 0,
    simplification: str = DEFAULT_SIMPLIFICATION,
    task_types: Sequence[str] | None = None,
    balanced: bool = False,
) -> list[TaskSpec]:
    """The `TaskSpec`s of a split: ``"train"`` (3322), ``"iid"`` (1661), ``"ood"`` (1684), ``"held_out_types"``
    (549) or ``"train_seen_types"`` (2242).

    Args:
        num_tasks: draw this many (task, variation) pairs without replacement (seeded by `seed`); None = all, in
            task-then-variation order.
        simplification: the simulator's simplification string, stored in each task's `extra` ("easy" = teleport,
            open doors and containers, self-watering pots, no electrical actions except in electrical tasks).
        task_types: keep only these task types (simulator names or ids like "1-1").
        balanced: draw round-robin over task types (equal counts per type) instead of uniformly over pairs (which
            favours the types with many variations).

    ScienceWorld episodes are determined by (task, variation); `TaskSpec.seed` is 0.
    """
    name = SPLIT_ALIASES.get(split.lower(), split.lower())
    pairs = split_pairs(name)
    if task_types is not None:
        wanted = {infer_task(t) for t in task_types}
        unknown = wanted - set(ALL_TASKS)
        if unknown:
            raise ValueError(f"Unknown ScienceWorld task types {sorted(unknown)}; known: {list(ALL_TASKS)}.")
        pairs = [p for p in pairs if p[0] in wanted]
        if not pairs:
            raise ValueError(f"The split {split!r} has no variations of the task types {sorted(wanted)}.")
    if num_tasks is not None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1 (or None for the whole split), got {num_tasks}.")
        if num_tasks > len(pairs):
            raise ValueError(f"The split {split!r} has {len(pairs)} (task, variation) pairs; num_tasks={num_tasks}.")
        rng = random.Random(f"sciworld/{name}/{seed}")
        if balanced:
            by_type: dict[str, list[tuple[str, int]]] = {}
            for pair in pairs:
                by_type.setdefault(pair[0], []).append(pair)
            queues = [rng.sample(group, len(group)) for _, group in sorted(by_type.items())]
            rng.shuffle(queues)
            picked: list[tuple[str, int]] = []
            while len(picked) < num_tasks:
                for queue in queues:
                    if queue and len(picked) < num_tasks:
                        picked.append(queue.pop())
            pairs = picked
        else:
            pairs = rng.sample(pairs, num_tasks)
    extra = {"simplification": simplification}
    return [TaskSpec(env=ENV_NAME, task=t, variation=v, seed=0, split=name, extra=dict(extra)) for t, v in pairs]


def make_dataset(split: str = "train", num_tasks: int | None = None, seed: int = 0, **kwargs):
    """A `datasets.Dataset` of ScienceWorld tasks (one row per (task, variation); TRL repeats each row
    `num_generations` times, so the members of a GRPO group play the same task). Keyword arguments go to
    `make_tasks`."""
    from datasets import Dataset

    tasks = make_tasks(split, num_tasks=num_tasks, seed=seed, **kwargs)
    return Dataset.from_dict(task_rows(tasks, prompt_of=_row_prompt))


def _row_prompt(spec: TaskSpec) -> str:
    return f"ScienceWorld task {spec.task}, variation {spec.variation}"
