"""ALFWorld (Shridhar et al., ICLR 2021) as a `TextEnv`: household tasks in TextWorld, played through alfworld's own
PDDL engine with the installed alfworld release's domain and grammar.

* `data` — data roots, the solvable games of a split, `make_tasks` / `make_dataset`.
* `env` — `AlfWorldEnv`, the adapter.
* `pddl` — game files, task types, the once-per-game PDDL -> SAS translation; `engine` — the compiled engine.
* `planner` — the expert planner (`expert_plan`); `expert` — expert episodes -> SFT data (`expert_sft_dataset`).
* `scenes`, `games`, `game_writer` — offline game generation (``trl-epo-alfworld-games``).

Its defaults (50 turns per episode) are its registry entry's: ``get_env("alfworld")``. Importing this package needs
no ``alfworld`` install; playing or generating games does (``pip install 'trl-epo[alfworld]'``).
"""

from .data import (
    DATA_DIR,
    ENV_NAME,
    SPLIT_DIRS,
    SPLIT_NAMES,
    find_games,
    make_dataset,
    make_tasks,
    resolve_data_root,
    split_dir,
)
from .env import DEFAULT_MAX_TURNS, AlfWorldEnv, normalize_command, split_intro
from .expert import expert_episode, expert_sft_dataset
from .pddl import GAME_FILE, TASK_TYPE_ALIASES, TASK_TYPES, TRAJ_FILE, GameFile, canonical_task_type, read_game
from .planner import ExpertError, SceneFacts, expert_plan


__all__ = [
    "DATA_DIR",
    "DEFAULT_MAX_TURNS",
    "ENV_NAME",
    "GAME_FILE",
    "SPLIT_DIRS",
    "SPLIT_NAMES",
    "TASK_TYPES",
    "TASK_TYPE_ALIASES",
    "TRAJ_FILE",
    "AlfWorldEnv",
    "ExpertError",
    "GameFile",
    "SceneFacts",
    "canonical_task_type",
    "expert_episode",
    "expert_plan",
    "expert_sft_dataset",
    "find_games",
    "make_dataset",
    "make_tasks",
    "normalize_command",
    "read_game",
    "resolve_data_root",
    "split_dir",
    "split_intro",
]
