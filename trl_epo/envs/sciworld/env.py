"""ScienceWorld (Wang et al., 2022) as a `TextEnv`: one simulator JVM per env, re-used across episodes.

Each `ScienceWorldEnv` owns one lean JVM (`jvm.ScienceWorldJVM`, started lazily at the first `reset`); every `reset`
re-`load`s a task in the same JVM. The per-step valid-action list (most of the package's step time) is computed only
when asked for.

Success is ``score == 100`` (the task is done). The paper's code counts ``done and score > 0``, which a policy can
game (a few useful moves, then ``wait`` until the move limit): that number is always reported as
``info["won_paper"]``, and ``success_rule="paper"`` makes it the success signal, for replication only.

A JVM that dies (killed, out of memory) fails its episode with a `JVMDiedError` ("The ScienceWorld JVM died ..."),
whichever call noticed it first; the next `reset` starts a fresh JVM.

Model text is data here: it is only ever sent to the simulator's own command parser.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from py4j.protocol import Py4JError, Py4JJavaError
from scienceworld.utils import infer_task

from ..base import MAX_ACTION_CHARS, StepResult, TaskSpec
from ..registry import find_env
from .jvm import DEFAULT_JAVA_OPTIONS, JVM_EXIT_GRACE_SECONDS, JVMDiedError, ScienceWorldJVM, find_java
from .tasks import ALL_TASKS, DEFAULT_SIMPLIFICATION, ENV_NAME


SUCCESS_RULES = ("score", "paper")
TEMPLATE_PLACEMENTS = ("task", "every_step", "never")
REWARD_MODES = ("success", "score_delta")
SIMPLIFICATIONS = (
    "easy",
    "teleportAction",
    "selfWateringFlowerPots",
    "openContainers",
    "openDoors",
    "noElectricalAction",
)

# Simulator replies meaning "the command was not understood / not carried out".
INVALID_REPLY_PREFIXES = (
    "No known action matches that input",
    "Unknown action.",
    "ERROR: Unknown response",
    "ERROR: Value out of range",
)
AMBIGUOUS_REPLY_PREFIX = "Ambiguous request"
HIDDEN_TEMPLATES = ("reset task",)  # would restart the episode mid-way: not offered to the agent
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def normalize_action(action: Any) -> str:
    """The command sent to the simulator: a string, control characters removed, whitespace collapsed."""
    text = action if isinstance(action, str) else ("" if action is None else str(action))
    return " ".join(_CONTROL_CHARS.sub(" ", text).split())


def check_simplification(value: str) -> str:
    """The simulator's simplification string, validated (``"easy"``, ``""`` or a comma list of presets)."""
    value = (value or "").replace(" ", "")
    unknown = [s for s in value.split(",") if s and s not in SIMPLIFICATIONS]
    if unknown:
        raise ValueError(
            f"Unknown ScienceWorld simplification(s) {unknown}; use 'easy', '' or a comma list of "
            f"{list(SIMPLIFICATIONS[1:])}."
        )
    return value


@dataclass
class _Episode:
    spec: TaskSpec
    simplification: str
    task_description: str
    templates_text: str
    turns: int = 0
    score: int = 0
    done: bool = False
    won: bool = False


class ScienceWorldEnv:
    """ScienceWorld as a `TextEnv` (see the module docstring). All arguments are plain values, so
    ``functools.partial(ScienceWorldEnv, ...)`` is a picklable `EnvPool` factory.

    Args:
        max_turns: the episode's move limit: after this many `step` calls the episode ends (not won, under the
            default success rule). The rollout's own `max_turns` also applies.
        success_rule: ``"score"`` (default): won = score == 100, the task is done. ``"paper"``: won = done and
            score > 0, the rule of the paper's code (gameable; for replication only). Both are always in `info`
            (``won_strict``, ``won_paper``).
        reward: ``"success"`` (1.0 on the step the episode is won) or ``"score_delta"`` (score change / 100).
        admissible_actions: compute the simulator's valid action list at every step (`StepResult.admissible_actions`).
            Costly (most of a step's time); off by default.
        show_action_templates: where the task's action templates ("open OBJ", "move OBJ to OBJ", ...) are shown:
            ``"task"`` (default) appends them to `info["task_description"]`, so the rollout shows them once in a
            full-context conversation and in every windowed prompt (``env_history_turns=k``); ``"every_step"``
            appends them to every observation; ``"never"``. `info["task_text"]` is the bare task description.
        show_objects: append the objects the agent can refer to (in its current room) to every observation.
        with_gold_path: have the simulator generate the gold action sequence at reset (`info["gold_actions"]`); slow
            for some tasks (up to ~10 s), for expert data only.
        default_simplification: used when a task row carries none in its `extra` (``"easy"``, ``""`` or a comma list
            of teleportAction, openDoors, openContainers, selfWateringFlowerPots, noElectricalAction).
        max_action_chars: longer actions are rejected (flagged invalid) without reaching the simulator.
        java_options: JVM options (default lean: 512 MB heap, serial GC, one processor).
        java_path: the `java` executable (default: ``$JAVA_HOME/bin/java``, else `java` on PATH).
        state_keys: put GiGPO's anchor key of the state in `info["anchor"]` (`_state_key`: two free JVM calls a step,
            a look and the inventory); False saves them when no GiGPO run reads the key.
    """

    name = ENV_NAME

    def __init__(
        self,
        max_turns: int = 30,
        success_rule: str = "score",
        reward: str = "success",
        admissible_actions: bool = False,
        show_action_templates: str = "task",
        show_objects: bool = True,
        with_gold_path: bool = False,
        default_simplification: str = DEFAULT_SIMPLIFICATION,
        max_action_chars: int = MAX_ACTION_CHARS,
        java_options: Sequence[str] = DEFAULT_JAVA_OPTIONS,
        java_path: str | None = None,
        state_keys: bool = True,
    ):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}.")
        if success_rule not in SUCCESS_RULES:
            raise ValueError(f"success_rule must be one of {SUCCESS_RULES}, got {success_rule!r}.")
        if reward not in REWARD_MODES:
            raise ValueError(f"reward must be one of {REWARD_MODES}, got {reward!r}.")
        if show_action_templates not in TEMPLATE_PLACEMENTS:
            raise ValueError(
                f"show_action_templates must be one of {TEMPLATE_PLACEMENTS}, got {show_action_templates!r}."
            )
        if max_action_chars < 1:
            raise ValueError(f"max_action_chars must be >= 1, got {max_action_chars}.")
        self.max_turns = max_turns
        self.success_rule = success_rule
        self.reward_mode = reward
        self.admissible_actions = admissible_actions
        self.show_action_templates = show_action_templates
        self.show_objects = show_objects
        self.with_gold_path = with_gold_path
        self.default_simplification = check_simplification(default_simplification)
        self.max_action_chars = max_action_chars
        self.java_options = tuple(java_options)
        self.java_path = java_path
        self.state_keys = state_keys
        find_java(java_path)  # fail at construction, with install instructions, when Java is missing
        self._jvm: ScienceWorldJVM | None = None
        self._episode: _Episode | None = None
        self._max_variations: dict[str, int] = {}

    # ---- the protocol
    def reset(self, task: TaskSpec | Mapping[str, Any]) -> StepResult:
        spec = TaskSpec.from_row(task)
        owner = find_env(spec.env)
        if owner is None or owner.name != ENV_NAME:
            raise ValueError(f"ScienceWorldEnv got a task for env {spec.env!r}; build tasks with sciworld.make_tasks.")
        name = infer_task(spec.task)
        if name not in ALL_TASKS:
            raise ValueError(f"Unknown ScienceWorld task {spec.task!r}; known tasks: {list(ALL_TASKS)}.")
        simplification = check_simplification(spec.extra.get("simplification", self.default_simplification))
        if ("power-component" in name or "conductivity" in name) and "noElectricalAction" in simplification:
            raise ValueError(
                f"Task {name!r} needs electrical actions: drop 'noElectricalAction' from its simplification."
            )
        self._episode = None
        try:
            return self._load(spec, name, simplification)
        except JVMDiedError:  # a JVM that died between episodes: nothing is lost yet, start a fresh one
            return self._load(spec, name, simplification)

    def step(self, action: str) -> StepResult:
        episode = self._episode
        if episode is None:
            raise RuntimeError("Call reset(task) before step(action).")
        if episode.done:
            return self._result("The episode is over.", reward=0.0, invalid=True)
        episode.turns += 1
        command = normalize_action(action)
        with self._simulator() as server:  # even an invalid command's observation lists the objects (a JVM call)
            if not command:
                return self._finish_turn(
                    "Invalid action: the command is empty. Give one command, e.g. 'look around'.",
                    previous=episode.score,
                    invalid=True,
                )
            if len(command) > self.max_action_chars:
                return self._finish_turn(
                    f"Invalid action: the command is too long ({len(command)} characters; at most "
                    f"{self.max_action_chars}). Give one short command.",
                    previous=episode.score,
                    invalid=True,
                )
            reply = str(server.step(command))
            previous, episode.score = episode.score, round(100 * float(server.getScore()))
            completed = bool(server.getCompleted())
            invalid = reply.startswith(INVALID_REPLY_PREFIXES)
            if invalid:
                reply += " Use the action templates with objects you can see (the command 'help' lists the actions)."
            return self._finish_turn(
                reply,
                previous=previous,
                invalid=invalid,
                completed=completed,
                ambiguous=reply.startswith(AMBIGUOUS_REPLY_PREFIX),
            )

    def close(self) -> None:
        self._episode = None
        jvm, self._jvm = self._jvm, None
        if jvm is not None:
            jvm.close()

    def __del__(self):  # a dropped env must not leave its JVM behind
        with contextlib.suppress(Exception):
            self.close()

    # ---- the simulator
    @property
    def jvm_pid(self) -> int | None:
        """The PID of this env's JVM (None before the first reset)."""
        return self._jvm.pid if self._jvm is not None else None

    def _load(self, spec: TaskSpec, name: str, simplification: str) -> StepResult:
        with self._simulator(starting=True) as server:
            if name not in self._max_variations:
                self._max_variations[name] = int(server.getTaskMaxVariations(name))
            if not 0 <= spec.variation < self._max_variations[name]:
                raise ValueError(
                    f"Task {name!r} has variations 0..{self._max_variations[name] - 1}; got variation "
                    f"{spec.variation}."
                )
            server.load(name, spec.variation, simplification, self.with_gold_path)
            self._episode = episode = _Episode(
                spec=spec,
                simplification=simplification,
                task_description=str(server.getTaskDescription()),
                templates_text=self._templates_text(server) if self.show_action_templates != "never" else "",
            )
            observation = self._decorate(str(server.freeActionLook()))
            result = self._result(observation, reward=0.0, invalid=False)
            result.info["task_text"] = episode.task_description
            result.info["task_description"] = (
                f"{episode.task_description}\n\n{episode.templates_text}"
                if self.show_action_templates == "task"
                else episode.task_description
            )
            if self.with_gold_path:
                result.info["gold_actions"] = [str(a) for a in server.getGoldActionSequence()]
            return result

    @contextlib.contextmanager
    def _simulator(self, starting: bool = False) -> Iterator[Any]:
        """The simulator's API for a run of calls; a JVM found dead raises `JVMDiedError` (and is dropped).

        `starting`: the calls load a new episode, so a fresh JVM is started when there is none. Otherwise the calls
        continue the running episode, whose state died with its JVM.

        A JVM's death shows in one of two ways: `poll()` already knows (checked first, no network call), or a call
        fails on the connection. A killed JVM closes its sockets a little before it can be reaped (all its threads
        must exit first), so right after a kill `poll()` may still say "running" while the call fails with a py4j
        network error: such a failure waits briefly for the JVM to exit, so that a dead JVM is always reported as
        dead, whichever sign came first. A Java exception (`Py4JJavaError`) means the JVM is alive: it is passed on.
        """
        jvm = self._jvm
        if jvm is not None and not jvm.alive():
            self._jvm_died(jvm, during_episode=not starting)
        if self._jvm is None:
            self._jvm = ScienceWorldJVM(self.java_options, self.java_path)
        jvm = self._jvm
        try:
            yield jvm.server
        except Py4JJavaError:
            raise
        except Py4JError as error:
            if jvm.exited_within(JVM_EXIT_GRACE_SECONDS):
                self._jvm_died(jvm, during_episode=True, cause=error)
            raise

    def _jvm_died(self, jvm: ScienceWorldJVM, during_episode: bool, cause: BaseException | None = None) -> None:
        """Drop a dead JVM; raise `JVMDiedError` when an episode was running in it (its state is gone)."""
        how = jvm.exit_description()
        jvm.close()
        self._jvm = None
        if during_episode:
            self._episode = None
            raise JVMDiedError(
                f"The ScienceWorld JVM died during the episode ({how}; killed, or out of memory: see the "
                "java_options' -Xmx); reset to start a new one."
            ) from cause

    def _finish_turn(
        self, reply: str, previous: int, invalid: bool, completed: bool = False, ambiguous: bool = False
    ) -> StepResult:
        episode = self._episode
        score = episode.score
        won_strict = score >= 100
        failed = score < 0  # e.g. focusing on the wrong object: the simulator ends the task
        over_limit = episode.turns >= self.max_turns
        episode.done = completed or won_strict or failed or over_limit
        won_paper = episode.done and score > 0
        newly_won = (won_strict if self.success_rule == "score" else won_paper) and not episode.won
        episode.won = episode.won or newly_won
        if self.reward_mode == "success":
            reward = 1.0 if newly_won else 0.0
        else:
            reward = (score - previous) / 100.0
        result = self._result(self._decorate(reply), reward=reward, invalid=invalid)
        result.info.update(
            won_strict=won_strict,
            won_paper=won_paper,
            failed=failed,
            truncated=over_limit and not (completed or won_strict or failed),
            ambiguous=ambiguous,
        )
        return result

    def _result(self, observation: str, reward: float, invalid: bool) -> StepResult:
        episode = self._episode
        admissible = None
        if self.admissible_actions and not episode.done:  # called inside `_simulator()`: the JVM is up
            payload = json.loads(str(self._jvm.server.getValidActionObjectCombinationsJSON()))
            admissible = [str(item["action"]) for item in payload.get("validActions", [])]
        result = StepResult(
            observation=observation,
            reward=reward,
            done=episode.done,
            won=episode.won,
            admissible_actions=admissible,
            info={
                "score": float(episode.score),
                "invalid_action": invalid,
                "turns": episode.turns,
                "task": episode.spec.task,
                "variation": episode.spec.variation,
            },
        )
        if self.state_keys:
            result.info["anchor"] = self._state_key() if not episode.done else "sciworld:done"
        return result

    def _state_key(self) -> str:
        """GiGPO's anchor key: the room (a free `look`) and the inventory, each line-sorted, and the score. A step's
        reply describes the action ("The door is now open."), not the state, and the look lists a room's contents in
        an order that is not canonical."""
        server = self._jvm.server
        look = sorted(line.strip() for line in str(server.freeActionLook()).splitlines() if line.strip())
        inventory = sorted(line.strip() for line in str(server.freeActionInventory()).splitlines() if line.strip())
        return "\n".join(look + ["--- inventory"] + inventory + [f"--- score {self._episode.score}"])

    def _decorate(self, text: str) -> str:
        episode = self._episode
        parts = [text.strip()]
        if not episode.done:
            if self.show_objects:
                parts.append("Objects you can refer to: " + self._objects_text())
            if episode.templates_text and self.show_action_templates == "every_step":
                parts.append(episode.templates_text)
        return "\n\n".join(p for p in parts if p)

    def _objects_text(self) -> str:
        lut = json.loads(str(self._jvm.server.getPossibleObjectReferentLUTJSON()))
        names = sorted({str(v) for v in lut.values()} - {"agent"})
        return ", ".join(names) if names else "(none)"

    @staticmethod
    def _templates_text(server) -> str:
        entries = json.loads(str(server.getPossibleActionsWithIDs()))
        templates = sorted({str(e["action_example"]) for e in entries} - set(HIDDEN_TEMPLATES))
        return "Action templates (OBJ = an object you can refer to): " + ", ".join(templates)
