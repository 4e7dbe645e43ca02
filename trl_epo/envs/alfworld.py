"""ALFWorld (Shridhar et al., ICLR 2021) as a `TextEnv`: household tasks in TextWorld, played through alfworld's own
PDDL engine with the installed alfworld release's domain and grammar (see `alfworld_engine`).

Data. Games are read from the official ``json_2.1.1`` layout::

    <data root>/json_2.1.1/<split>/<task-type>-<object>-<mrecep>-<parent>-<scene>/<trial>/
        game.tw-pddl  traj_data.json  initial_state.pddl

with ``<split>`` = ``train`` (train), ``valid_seen`` (IID evaluation) and ``valid_unseen`` (OOD evaluation). The data
root is the ``data_root`` argument, else ``$ALFWORLD_DATA`` (where ``alfworld-download`` puts the official games).
Without internet, ``trl-epo-alfworld-games --out DIR`` writes games of the same layout (`alfworld_games`).
Dataset rows store the game path *relative to the data root*, so a dataset works on any machine that has the games.

Episodes. The first observation is the room description; the task sentence ("put some pencil on dresser.") goes to
``info["task_description"]``. Admissible commands come from the engine (``help`` is left out). A command the engine
does not accept gets its reply ("Nothing happens.") and ``info["invalid_action"] = True``. The episode is won when the
engine's goal check holds (reward 1.0 on that turn; ``info["score"]`` is 100 when won, 0 otherwise, on the 0-100
scale of the other envs) and ends after `max_turns` turns (50, as in the paper).

Parallelism. Use `EnvPool`'s process backend (the default): one env per worker process, stepping and resetting in
parallel. The thread backend works too (engine calls are serialised by process-wide locks, since TextWorld's grammar
parsers are module-level), but gives no parallelism.

Resets. A reset costs a PDDL -> SAS translation (0.2-0.5 s) the first time a game is played in a process, ~0.1 s after
(`CompiledGameCache`). `EnvPool` resets its slots in parallel worker processes; `AlfWorldEnv.prefetch(tasks)`
translates the games an env will play next in a background thread, ahead of need, so that their resets are fast.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .alfworld_engine import (
    GAME_FILE,
    NOTHING_HAPPENS,
    TASK_TYPES,
    TRAJ_FILE,
    WELCOME_BANNER,
    CompiledGameCache,
    canonical_task_type,
    new_engine,
)
from .alfworld_expert import ExpertError, SceneFacts, expert_plan
from .base import StepResult, TaskSpec, task_rows
from .prompting import PromptStyle, expert_turns


ENV_NAME = "alfworld"
DEFAULT_MAX_TURNS = 50
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


# --------------------------------------------------------------------------------------------------------------------
# Where the games are
# --------------------------------------------------------------------------------------------------------------------


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
        TaskSpec(env=ENV_NAME, task=path, split=name,
                 extra={"task_type": task_type, "scene": _scene_of(path)})
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


# --------------------------------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------------------------------


def normalize_command(action: str) -> str:
    """How an agent's action is matched to the engine's commands: whitespace collapsed, lower case, no final period."""
    return " ".join(str(action).split()).lower().rstrip(".").rstrip()


class AlfWorldEnv:
    """An ALFWorld game as a `TextEnv` (see the module docstring).

    Args:
        data_root: the ALFWorld data root (default ``$ALFWORLD_DATA``); task paths are relative to it.
        max_turns: the episode ends (not won) after this many steps.
        list_actions: return the admissible commands with every observation (``help`` left out).
        normalize_actions: match actions case- and whitespace-insensitively (`normalize_command`).
        cache_size: how many translated games this env keeps (each is ~1-2 MB).

    All arguments are plain values, so ``functools.partial(AlfWorldEnv, data_root=...)`` is a picklable `EnvPool`
    factory.
    """

    name = ENV_NAME

    def __init__(
        self,
        data_root: str | None = None,
        max_turns: int = DEFAULT_MAX_TURNS,
        list_actions: bool = True,
        normalize_actions: bool = True,
        cache_size: int = 16,
    ):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}.")
        self.data_root = os.fspath(data_root) if data_root is not None else None
        self.max_turns = max_turns
        self.list_actions = list_actions
        self.normalize_actions = normalize_actions
        self.cache = CompiledGameCache(max_size=cache_size)
        self._root: str | None = None
        self._engine = None
        self._state = None
        self._game = None
        self._spec: TaskSpec | None = None
        self._prefetch_queue: queue.Queue | None = None
        self._prefetch_thread: threading.Thread | None = None
        self._initial_facts = None

    # ---- the protocol
    def reset(self, task: TaskSpec | Mapping[str, Any]) -> StepResult:
        spec = TaskSpec.from_row(task)
        path = self.game_path(spec)
        compiled = self.cache.get(path)
        if self._engine is None:
            self._engine = new_engine()
        self._engine.load_compiled(compiled)
        self._state = self._engine.reset()
        self._game = compiled.game
        self._spec = spec
        self._initial_facts = None
        self.turns = 0
        self.won = bool(self._state["won"])
        self.done = self.won
        observation, description = split_intro(self._state.feedback)
        result = self._result(observation, reward=0.0)
        result.info.update(
            task_description=description or self._game.task_sentence,
            task_type=self._game.task_type,
            gamefile=spec.task,
        )
        if self.won:  # a broken game: solved before the first move
            result.info["won_at_reset"] = True
        return result

    def step(self, action: str) -> StepResult:
        if self._state is None:
            raise RuntimeError("Call reset(task) before step(action).")
        if self.done:
            result = self._result("The episode is over.", reward=0.0)
            result.info["invalid_action"] = True
            return result
        self.turns += 1
        command = normalize_command(action) if self.normalize_actions else str(action).strip()
        accepted = command in self._state["_valid_commands"]
        if accepted:
            self._state, _, _ = self._engine.step(command)
            text = self._state.feedback
        else:  # what the engine answers to a command it does not know, without asking it (the state is unchanged)
            text = NOTHING_HAPPENS
        reward = 0.0
        if accepted and self._state["won"] and not self.won:
            self.won, reward = True, 1.0
        self.done = self.won or self.turns >= self.max_turns
        result = self._result(text, reward=reward)
        result.info["invalid_action"] = not accepted
        return result

    def close(self) -> None:
        if self._prefetch_queue is not None:
            self._prefetch_queue.put(None)
            self._prefetch_queue = None
        if self._engine is not None:
            try:
                self._engine.close()
            except Exception:
                pass
            self._engine = None
        self._state = None

    # ---- ahead of need
    def prefetch(self, tasks: Iterable[TaskSpec | Mapping[str, Any]]) -> None:
        """Translate these games in a background thread, so that resetting into them later is fast. Returns at once.
        Games already cached are skipped; a game file that does not exist raises here, one that fails to translate is
        left for `reset` to report."""
        paths = [self.game_path(TaskSpec.from_row(t)) for t in tasks]
        if self._prefetch_queue is None:
            self._prefetch_queue = queue.Queue()
            self._prefetch_thread = threading.Thread(
                target=_prefetch_loop, args=(self._prefetch_queue, self.cache), daemon=True, name="alfworld-prefetch"
            )
            self._prefetch_thread.start()
        for path in paths:
            self._prefetch_queue.put(path)

    # ---- helpers
    def game_path(self, spec: TaskSpec) -> str:
        """The game file of a task (its ``task`` is a path relative to the data root, or absolute)."""
        path = spec.task
        if not os.path.isabs(path):
            if self._root is None:
                self._root = resolve_data_root(self.data_root)
            path = os.path.join(self._root, path)
        if os.path.isdir(path):
            path = os.path.join(path, GAME_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"ALFWorld game not found: {path}. Dataset rows hold paths relative to the data root; build the env "
                "with the data_root the dataset was made from (AlfWorldEnv(data_root=...)) or set ALFWORLD_DATA."
            )
        return path

    def admissible_actions(self) -> list[str]:
        return [c for c in self._state["admissible_commands"] if c != "help"]

    def expert_actions(self) -> list[str]:
        """A winning command sequence from the start of the current game: its walkthrough when the game file has
        one, else the constructive expert's plan (`alfworld_expert.expert_plan`)."""
        if self._game is None:
            raise RuntimeError("Call reset(task) before expert_actions().")
        if self._game.walkthrough:
            return list(self._game.walkthrough)
        return self.expert_plan()

    def expert_plan(self) -> list[str]:
        """The constructive expert's plan for the current game, from its initial state."""
        if self._game is None:
            raise RuntimeError("Call reset(task) before expert_plan().")
        if not self._game.task_type:
            raise ExpertError(f"{self._game.path}: no {TRAJ_FILE} with the task type next to the game file.")
        facts = self.initial_facts()
        names = {k: info.name for k, info in self._engine._entity_infos.items()}
        return expert_plan(SceneFacts.from_facts(facts, names), self._game.task_type, self._game.params)

    def initial_facts(self) -> list:
        """The PDDL facts of the current game's initial state (TextWorld `Proposition`s)."""
        if self._initial_facts is None:
            if self.turns == 0:
                self._initial_facts = self._engine.facts()
            else:  # replay from the start in a scratch engine; this env's episode is left as it is
                scratch = new_engine()
                try:
                    scratch.load_compiled(self.cache.get(self._game.path))
                    scratch.reset()
                    self._initial_facts = scratch.facts()
                finally:
                    scratch.close()
        return self._initial_facts

    def _result(self, observation: str, reward: float) -> StepResult:
        return StepResult(
            observation=observation,
            reward=reward,
            done=self.done,
            won=self.won,
            admissible_actions=self.admissible_actions() if self.list_actions else None,
            info={"score": 100.0 if self.won else 0.0, "turn": self.turns},
        )


def _prefetch_loop(jobs: queue.Queue, cache: CompiledGameCache) -> None:
    while True:
        path = jobs.get()
        if path is None:
            return
        try:
            cache.prefetch(path)
        except Exception:  # reset() reports the error when the game is played
            pass


def split_intro(text: str) -> tuple[str, str]:
    """Split the engine's first text into (room description, task sentence)."""
    body = text.replace(WELCOME_BANNER, "").strip()
    marker = "Your task is to:"
    if marker in body:
        head, _, task = body.rpartition(marker)
        return head.strip(), task.strip()
    return body, ""


# --------------------------------------------------------------------------------------------------------------------
# Expert demonstrations -> SFT data
# --------------------------------------------------------------------------------------------------------------------


def expert_episode(env: AlfWorldEnv, task: TaskSpec | Mapping[str, Any]) -> list[tuple[StepResult, str]]:
    """Play a game with its walkthrough (or the expert's plan): ``[(observation result, action taken), ...]`` and the
    final result last as ``(result, "")``. Raises `ExpertError` when the plan does not win through the engine."""
    result = env.reset(task)
    actions = env.expert_actions()
    steps = []
    for action in actions:
        steps.append((result, action))
        result = env.step(action)
        if result.info.get("invalid_action"):
            raise ExpertError(f"{env.game_path(TaskSpec.from_row(task))}: expert action {action!r} was not accepted.")
        if result.done:
            break
    steps.append((result, ""))
    if not result.won:
        raise ExpertError(f"{env.game_path(TaskSpec.from_row(task))}: the expert's {len(actions)} actions did not win.")
    return steps


def expert_sft_dataset(
    tasks: Sequence[TaskSpec | Mapping[str, Any]] | Any,
    data_root=None,
    history: int | None = None,
    prompt_style: PromptStyle | None = None,
    max_turns: int = DEFAULT_MAX_TURNS,
    skip_failures: bool = False,
):
    """A chat-format SFT dataset of expert demonstrations, one row per expert turn, in TRL's conversational
    prompt-completion format (only the completion is trained on)::

        {"prompt": [system, user, assistant, user, ...],
         "completion": [{"role": "assistant", "content": "<action>go to drawer 1</action>"}], ...}

    Prompts are laid out exactly as `MultiTurnRollout` lays them out (`PromptStyle`), so that a model fine-tuned on
    them starts RL from familiar contexts:

    * ``history=None`` (the rollout's default, full context): the whole conversation so far: the system instruction,
      the first user message (task, observation, admissible actions), then every expert answer and the observation
      that followed it;
    * ``history=k`` (the rollout's ``history_turns=k``, the paper's windowed prompts): the system instruction and one
      user message with the task, the last k (observation, action) pairs and the current observation.

    Args:
        tasks: task specs / rows, or a `datasets.Dataset` from `make_dataset`.
        data_root: the data root the tasks' paths are relative to.
        skip_failures: leave out games the expert cannot win (else raise `ExpertError`).
    """
    from datasets import Dataset

    style = prompt_style or PromptStyle()
    env = AlfWorldEnv(data_root=data_root, max_turns=max_turns)
    columns: dict[str, list] = {"prompt": [], "completion": [], "task": [], "task_type": [], "turn": []}
    try:
        for task in tasks:
            spec = TaskSpec.from_row(task)
            try:
                steps = expert_episode(env, spec)
            except ExpertError:
                if skip_failures:
                    continue
                raise
            first, _ = steps[0]
            description = first.info.get("task_description", "")
            for turn, (prompt, answer) in enumerate(expert_turns(style, description, steps[:-1], history)):
                columns["prompt"].append(prompt)
                columns["completion"].append([answer])
                columns["task"].append(spec.task)
                columns["task_type"].append(first.info.get("task_type") or "")
                columns["turn"].append(turn)
    finally:
        env.close()
    return Dataset.from_dict(columns)
