"""An ALFWorld game as a `TextEnv` (`AlfWorldEnv`): household tasks in TextWorld, played through the compiled engine
(`engine`) with the installed alfworld release's domain and grammar.

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

import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from ..base import StepResult, TaskSpec
from .data import ENV_NAME, resolve_data_root
from .engine import NOTHING_HAPPENS, WELCOME_BANNER, new_engine
from .pddl import GAME_FILE, TRAJ_FILE, CompiledGameCache
from .planner import ExpertError, SceneFacts, expert_plan


DEFAULT_MAX_TURNS = 50


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
        self._static_predicates = compiled.static_predicates
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
            with contextlib.suppress(Exception):  # closing is best effort: the engine is dropped either way
                self._engine.close()
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
        one, else the expert planner's plan (`planner.expert_plan`)."""
        if self._game is None:
            raise RuntimeError("Call reset(task) before expert_actions().")
        if self._game.walkthrough:
            return list(self._game.walkthrough)
        return self.expert_plan()

    def expert_plan(self) -> list[str]:
        """The expert planner's plan for the current game, from its initial state."""
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
            info={"score": 100.0 if self.won else 0.0, "turn": self.turns, "anchor": self.state_key()},
        )

    def state_key(self) -> str:
        """GiGPO's anchor key: a digest of the world state, the engine's fluent facts (the predicates the game's
        actions change; negated facts left out), sorted. The engine's feedback describes the last action ("You pick
        up the apple 1 ...", "Nothing happens.") rather than the state: equal texts can be different states, and one
        state can follow different texts."""
        static = self._static_predicates
        facts = sorted(
            str(f) for f in self._engine.facts() if f.name.lower() not in static and not f.name.startswith("not_")
        )
        return "alfworld:" + hashlib.sha1("\n".join(facts).encode()).hexdigest()[:20]


def _prefetch_loop(jobs: queue.Queue, cache: CompiledGameCache) -> None:
    while True:
        path = jobs.get()
        if path is None:
            return
        with contextlib.suppress(Exception):  # reset() reports the error when the game is played
            cache.prefetch(path)


def split_intro(text: str) -> tuple[str, str]:
    """Split the engine's first text into (room description, task sentence)."""
    body = text.replace(WELCOME_BANNER, "").strip()
    marker = "Your task is to:"
    if marker in body:
        head, _, task = body.rpartition(marker)
        return head.strip(), task.strip()
    return body, ""
