"""ScienceWorld (Wang et al., 2022) as a `TextEnv`: one lean JVM per env, the paper's splits, gold-path expert data.

* `ScienceWorldEnv` — the adapter. Each instance owns one simulator JVM (started lazily at the first `reset`, with
  lean options: ``-Xmx512m -XX:+UseSerialGC -XX:ActiveProcessorCount=1`` cut its resident memory from ~2.5 GB to
  ~0.45 GB), reached through py4j the way the `scienceworld` package does it. Every `reset` re-`load`s a task in the
  same JVM. The per-step valid-action list (most of the package's step time) is computed only when asked for.
* Success is ``score == 100`` (the task is done). The paper's code counts ``done and score > 0``, which a policy can
  game (a few useful moves, then ``wait`` until the move limit): that number is always reported as
  ``info["won_paper"]``, and ``success_rule="paper"`` makes it the success signal, for replication only.
* `make_tasks` / `make_dataset` build the paper's splits from the package's own train/dev/test variation API;
  `expert_sft_dataset` turns the simulator's gold action sequences into chat-format SFT data.

Model text is data here: it is only ever sent to the simulator's own command parser.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .base import StepResult, TaskSpec, task_rows
from .prompting import PromptStyle, expert_conversation, expert_turns
from .registry import SCIWORLD_INSTRUCTION, get_env


try:
    from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
    from scienceworld.constants import BASEPATH as SCIENCEWORLD_DIR
    from scienceworld.constants import ID2TASK, JAR_PATH
    from scienceworld.utils import infer_task
    from scienceworld.version import __version__ as SCIENCEWORLD_VERSION
except ImportError as _error:  # pragma: no cover - depends on the installation
    raise ImportError(
        "ScienceWorldEnv needs the `scienceworld` package (and Java): pip install 'trl-epo[sciworld]' "
        "(= scienceworld==1.2.3), and a JDK/JRE >= 11, e.g. apt-get install -y openjdk-17-jre-headless."
    ) from _error


ENV_NAME = "sciworld"
ENV_ALIASES = ("sciworld", "scienceworld")

DEFAULT_JAVA_OPTIONS = ("-Xmx512m", "-XX:+UseSerialGC", "-XX:ActiveProcessorCount=1")
DEFAULT_SIMPLIFICATION = "easy"
SUCCESS_RULES = ("score", "paper")
TEMPLATE_PLACEMENTS = ("task", "every_step", "never")
REWARD_MODES = ("success", "score_delta")

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
SPLIT_ALIASES = {"dev": "iid", "test": "ood", "l0": "iid", "l1": "ood", "l2": "held_out_types",
                 "heldout": "held_out_types", "held_out": "held_out_types"}

# Simulator replies meaning "the command was not understood / not carried out".
INVALID_REPLY_PREFIXES = (
    "No known action matches that input",
    "Unknown action.",
    "ERROR: Unknown response",
    "ERROR: Value out of range",
)
AMBIGUOUS_REPLY_PREFIX = "Ambiguous request"
HIDDEN_TEMPLATES = ("reset task",)  # would restart the episode mid-way: not offered to the agent

def sciworld_prompt_style(**overrides) -> PromptStyle:
    """The `PromptStyle` for ScienceWorld (its registry defaults: the ScienceWorld instruction)."""
    return get_env("sciworld").prompt_style(**overrides)


# --------------------------------------------------------------------------------------------------------------------
# Java and the simulator JVM
# --------------------------------------------------------------------------------------------------------------------

JAVA_INSTALL_HINT = (
    "ScienceWorld runs its simulator in a Java virtual machine, and no `java` executable was found{where}. Install a "
    "Java runtime >= 11, e.g. `apt-get install -y openjdk-17-jre-headless` (Debian/Ubuntu), `conda install -c "
    "conda-forge openjdk=17` or `brew install openjdk@17`; then put `java` on PATH or set JAVA_HOME to the install "
    "directory (or pass java_path= to ScienceWorldEnv)."
)


class JavaNotFoundError(RuntimeError):
    """No Java runtime to run the ScienceWorld simulator (the message says how to install one)."""


def find_java(java_path: str | None = None) -> str:
    """The `java` executable to use: `java_path` if given, else ``$JAVA_HOME/bin/java``, else `java` on PATH.

    Raises `JavaNotFoundError` (saying how to install Java) when there is none.
    """
    if java_path:
        resolved = shutil.which(java_path)
        if resolved is None:
            raise JavaNotFoundError(JAVA_INSTALL_HINT.format(where=f" at java_path={java_path!r}"))
        return resolved
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = os.path.join(java_home, "bin", "java")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    resolved = shutil.which("java")
    if resolved is None:
        where = f" (JAVA_HOME={java_home!r} has no bin/java, and none is on PATH)" if java_home else " on PATH"
        raise JavaNotFoundError(JAVA_INSTALL_HINT.format(where=where))
    return resolved


def check_java(java_path: str | None = None) -> str:
    """Fail fast, with install instructions, when Java is missing; returns the `java` executable."""
    return find_java(java_path)


class ScienceWorldJVM:
    """One ScienceWorld simulator in its own JVM, reached through py4j.

    The `scienceworld` package starts its JVM with py4j's `launch_gateway` and no JVM options; this does the same
    with `java_options` (and without the package's py4j callback server, which the simulator never calls). The JVM
    reads its stdin (py4j's ``--die-on-broken-pipe``), so it exits when this process dies; it stays in this
    process's process group, so `EnvPool` kills it together with its worker.
    """

    def __init__(self, java_options: Sequence[str] = DEFAULT_JAVA_OPTIONS, java_path: str | None = None,
                 jar_path: str | None = None):
        self.java = find_java(java_path)
        self.java_options = tuple(java_options)
        jar = jar_path or JAR_PATH
        try:
            port, self.process = launch_gateway(
                classpath=jar, javaopts=list(self.java_options), java_path=self.java, die_on_exit=True,
                cwd=SCIENCEWORLD_DIR, return_proc=True,
            )
        except Exception as error:  # the JVM did not start (bad options, broken install, too old a Java)
            raise RuntimeError(
                f"Could not start the ScienceWorld JVM ({self.java} with options {list(self.java_options)}, jar "
                f"{jar}): {type(error).__name__}: {error}. Check `{self.java} -version` (Java >= 11 is needed) and the "
                "java_options."
            ) from error
        self._gateway = JavaGateway(
            gateway_parameters=GatewayParameters(port=port, auto_field=True), java_process=self.process
        )
        self.server = self._gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the JVM (idempotent); it is killed if it does not exit within `timeout` seconds."""
        if self.process.poll() is None:
            try:
                self._gateway.shutdown()
            except Exception:
                pass
            try:  # closing stdin makes a --die-on-broken-pipe gateway exit
                self.process.stdin.close()
            except Exception:
                pass
            try:
                self.process.wait(timeout=timeout)
            except Exception:
                self.process.kill()
                self.process.wait(timeout=timeout)
        else:
            try:
                self._gateway.close()
            except Exception:
                pass


# --------------------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------------------


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
        raise ValueError(f"Unknown ScienceWorld split {split!r}; use one of {sorted(SPLITS)} (aliases: {SPLIT_ALIASES}).")
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


# --------------------------------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------------------------------


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
        max_action_chars: int = 300,
        java_options: Sequence[str] = DEFAULT_JAVA_OPTIONS,
        java_path: str | None = None,
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
        self.default_simplification = _check_simplification(default_simplification)
        self.max_action_chars = max_action_chars
        self.java_options = tuple(java_options)
        self.java_path = java_path
        find_java(java_path)  # fail at construction, with install instructions, when Java is missing
        self._jvm: ScienceWorldJVM | None = None
        self._episode: _Episode | None = None
        self._max_variations: dict[str, int] = {}

    # ---- the protocol
    def reset(self, task: TaskSpec | Mapping[str, Any]) -> StepResult:
        spec = TaskSpec.from_row(task)
        if spec.env.lower() not in ENV_ALIASES:
            raise ValueError(f"ScienceWorldEnv got a task for env {spec.env!r}; build tasks with sciworld.make_tasks.")
        name = infer_task(spec.task)
        if name not in ALL_TASKS:
            raise ValueError(f"Unknown ScienceWorld task {spec.task!r}; known tasks: {list(ALL_TASKS)}.")
        simplification = _check_simplification(spec.extra.get("simplification", self.default_simplification))
        if ("power-component" in name or "conductivity" in name) and "noElectricalAction" in simplification:
            raise ValueError(f"Task {name!r} needs electrical actions: drop 'noElectricalAction' from its simplification.")
        server = self._server()
        if name not in self._max_variations:
            self._max_variations[name] = int(server.getTaskMaxVariations(name))
        if not 0 <= spec.variation < self._max_variations[name]:
            raise ValueError(
                f"Task {name!r} has variations 0..{self._max_variations[name] - 1}; got variation {spec.variation}."
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
            f"{episode.task_description}\n\n{episode.templates_text}" if self.show_action_templates == "task"
            else episode.task_description
        )
        if self.with_gold_path:
            result.info["gold_actions"] = [str(a) for a in server.getGoldActionSequence()]
        return result

    def step(self, action: str) -> StepResult:
        episode = self._episode
        if episode is None:
            raise RuntimeError("Call reset(task) before step(action).")
        if episode.done:
            return self._result("The episode is over.", reward=0.0, invalid=True)
        episode.turns += 1
        command = normalize_action(action)
        if not command:
            return self._finish_turn("Invalid action: the command is empty. Give one command, e.g. 'look around'.",
                                     previous=episode.score, invalid=True)
        if len(command) > self.max_action_chars:
            return self._finish_turn(
                f"Invalid action: the command is too long ({len(command)} characters; at most "
                f"{self.max_action_chars}). Give one short command.", previous=episode.score, invalid=True
            )
        server = self._server(running_episode=True)
        reply = str(server.step(command))
        previous, episode.score = episode.score, int(round(100 * float(server.getScore())))
        completed = bool(server.getCompleted())
        invalid = reply.startswith(INVALID_REPLY_PREFIXES)
        if invalid:
            reply += " Use the action templates with objects you can see (the command 'help' lists the actions)."
        return self._finish_turn(reply, previous=previous, invalid=invalid, completed=completed,
                                 ambiguous=reply.startswith(AMBIGUOUS_REPLY_PREFIX))

    def close(self) -> None:
        self._episode = None
        jvm, self._jvm = self._jvm, None
        if jvm is not None:
            jvm.close()

    def __del__(self):  # a dropped env must not leave its JVM behind
        try:
            self.close()
        except Exception:
            pass

    # ---- helpers
    @property
    def jvm_pid(self) -> int | None:
        """The PID of this env's JVM (None before the first reset)."""
        return self._jvm.pid if self._jvm is not None else None

    def _server(self, running_episode: bool = False):
        if self._jvm is not None and not self._jvm.alive():
            self._jvm.close()
            self._jvm = None
            if running_episode:  # the simulator state is gone with its JVM: this episode cannot go on
                self._episode = None
                raise RuntimeError("The ScienceWorld JVM died during the episode; reset to start a new one.")
        if self._jvm is None:
            self._jvm = ScienceWorldJVM(self.java_options, self.java_path)
        return self._jvm.server

    def _finish_turn(self, reply: str, previous: int, invalid: bool, completed: bool = False,
                     ambiguous: bool = False) -> StepResult:
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
        if self.admissible_actions and not episode.done:
            payload = json.loads(str(self._jvm.server.getValidActionObjectCombinationsJSON()))
            admissible = [str(item["action"]) for item in payload.get("validActions", [])]
        return StepResult(
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


_SIMPLIFICATIONS = ("easy", "teleportAction", "selfWateringFlowerPots", "openContainers", "openDoors",
                    "noElectricalAction")


def _check_simplification(value: str) -> str:
    value = (value or "").replace(" ", "")
    unknown = [s for s in value.split(",") if s and s not in _SIMPLIFICATIONS]
    if unknown:
        raise ValueError(f"Unknown ScienceWorld simplification(s) {unknown}; use 'easy', '' or a comma list of "
                         f"{list(_SIMPLIFICATIONS[1:])}.")
    return value


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def normalize_action(action: Any) -> str:
    """The command sent to the simulator: a string, control characters removed, whitespace collapsed."""
    text = action if isinstance(action, str) else ("" if action is None else str(action))
    return " ".join(_CONTROL_CHARS.sub(" ", text).split())


# --------------------------------------------------------------------------------------------------------------------
# Expert data: the simulator's gold action sequences
# --------------------------------------------------------------------------------------------------------------------

SFT_FORMATS = ("prompt_completion", "messages")


@dataclass
class GoldEpisode:
    """A gold action sequence replayed through `ScienceWorldEnv`: what the agent saw and did at every turn."""

    task: TaskSpec
    task_description: str
    first: StepResult
    actions: list[str]
    results: list[StepResult]

    @property
    def won(self) -> bool:
        return bool(self.results) and self.results[-1].won

    def steps(self) -> list[tuple[StepResult, str]]:
        """``[(result shown before the action, action), ...]``: what the agent saw before each gold action."""
        return list(zip([self.first, *self.results], self.actions))

    def messages(self, prompt_style: PromptStyle | None = None) -> list[dict[str, str]]:
        """The episode as the full-context rollout shows it to the policy: [system], the first user message (task and
        first observation), then alternating assistant answers (``<action>...</action>``) and user observations. It
        ends with the assistant's last answer."""
        return expert_conversation(prompt_style or sciworld_prompt_style(), self.task_description, self.steps())

    def windowed_turns(self, history: int, prompt_style: PromptStyle | None = None
                       ) -> list[tuple[list[dict[str, str]], dict[str, str]]]:
        """The episode as the windowed rollout (``history_turns=history``, the paper's layout) shows it: for every
        turn, ``(prompt, answer)`` with prompt = [system, one user message with the task, the last `history`
        (observation, action) pairs and the current observation]."""
        if history < 0:
            raise ValueError(f"history must be >= 0 (or use messages() for the full context), got {history}.")
        return expert_turns(prompt_style or sciworld_prompt_style(), self.task_description, self.steps(), history)


def _play_gold(reset: StepResult, step_fn) -> tuple[list[str], list[StepResult]]:
    actions, results = [], []
    for action in reset.info.get("gold_actions", []):
        result = step_fn(action)
        if result.env_error is not None:
            break
        actions.append(action)
        results.append(result)
        if result.done:
            break
    return actions, results


def gold_episodes(
    tasks: Sequence[TaskSpec | Mapping[str, Any]],
    env_kwargs: Mapping[str, Any] | None = None,
    num_workers: int = 1,
    keep_unsolved: bool = False,
) -> list[GoldEpisode]:
    """Replay the simulator's gold action sequence of each task through `ScienceWorldEnv(**env_kwargs)`.

    The env's own move limit applies (`env_kwargs["max_turns"]`, default 30): a gold path longer than that ends
    unsolved, and unsolved episodes are dropped unless `keep_unsolved`. With `num_workers > 1` the tasks are played
    in parallel, one JVM per worker (`EnvPool`, process backend). Gold-path generation takes 0.1-10 s per task.
    """
    import functools

    from .pool import EnvPool

    specs = [TaskSpec.from_row(t) for t in tasks]
    kwargs = dict(env_kwargs or {})
    kwargs["with_gold_path"] = True
    episodes: list[GoldEpisode] = []

    def collect(spec, first, actions, results):
        if first.env_error is not None:
            raise RuntimeError(f"ScienceWorld failed on {spec.task} variation {spec.variation}: {first.env_error}")
        episode = GoldEpisode(spec, first.info.get("task_description", ""), first, actions, results)
        if episode.won or (keep_unsolved and actions):
            episodes.append(episode)

    if num_workers <= 1:
        env = ScienceWorldEnv(**kwargs)
        try:
            for spec in specs:
                first = env.reset(spec)
                collect(spec, first, *_play_gold(first, env.step))
        finally:
            env.close()
        return episodes

    with EnvPool(functools.partial(ScienceWorldEnv, **kwargs), size=num_workers, backend="process",
                 reset_timeout=300.0) as pool:
        for start in range(0, len(specs), num_workers):
            wave = specs[start : start + num_workers]
            firsts = pool.reset(list(enumerate(wave)))
            plans = [list(f.info.get("gold_actions", [])) if f.env_error is None else [] for f in firsts]
            played: list[tuple[list[str], list[StepResult]]] = [([], []) for _ in wave]
            live = [slot for slot, plan in enumerate(plans) if plan]
            turn = 0
            while live:
                results = pool.step([(slot, plans[slot][turn]) for slot in live])
                still = []
                for slot, result in zip(live, results):
                    if result.env_error is not None:
                        continue
                    played[slot][0].append(plans[slot][turn])
                    played[slot][1].append(result)
                    if not result.done and turn + 1 < len(plans[slot]):
                        still.append(slot)
                live, turn = still, turn + 1
            for slot, spec in enumerate(wave):
                collect(spec, firsts[slot], *played[slot])
    return episodes


def expert_sft_dataset(
    split: str = "train",
    num_tasks: int | None = 64,
    seed: int = 0,
    simplification: str = DEFAULT_SIMPLIFICATION,
    task_types: Sequence[str] | None = None,
    balanced: bool = True,
    format: str = "prompt_completion",
    prompt_style: PromptStyle | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
    num_workers: int = 1,
    keep_unsolved: bool = False,
    tasks: Sequence[TaskSpec | Mapping[str, Any]] | None = None,
    history: int | None = None,
):
    """A chat-format SFT `datasets.Dataset` from ScienceWorld gold paths, in the rollout's message format.

    Each gold episode (see `gold_episodes`) becomes, with ``format="prompt_completion"`` (default), one row per turn:
    ``prompt`` = the conversation so far (system instruction, task and observations, earlier answers) and
    ``completion`` = the expert's answer ``[{"role": "assistant", "content": "<action>...</action>"}]`` (TRL's
    SFTTrainer trains on the completion only). With ``format="messages"``, one row per episode with the whole
    conversation in ``messages`` (train on assistant turns only with ``assistant_only_loss=True`` and a chat template
    that marks them). Every row also carries the task columns (`task`, `variation`, `turn`, `won`).

    `history=None` lays prompts out like the rollout's default full-context conversation; `history=k` like its
    windowed prompts (``env_history_turns=k``, the paper's layout: the task, the last k (observation, action) pairs
    and the current observation in one user message; prompt/completion rows only).

    The tasks are drawn with `make_tasks(split, num_tasks, seed, simplification, task_types, balanced)`, or given
    explicitly as `tasks` (TaskSpecs or dataset rows). Use the same `prompt_style` and `env_kwargs` (observation
    settings, `max_turns`) as the RL run that follows.
    """
    from datasets import Dataset

    if format not in SFT_FORMATS:
        raise ValueError(f"format must be one of {SFT_FORMATS}, got {format!r}.")
    if history is not None and format == "messages":
        raise ValueError("Windowed prompts (history=k) give one prompt per turn: use format='prompt_completion'.")
    if tasks is None:
        tasks = make_tasks(split, num_tasks=num_tasks, seed=seed, simplification=simplification,
                           task_types=task_types, balanced=balanced)
    episodes = gold_episodes(tasks, env_kwargs=env_kwargs, num_workers=num_workers, keep_unsolved=keep_unsolved)
    if not episodes:
        raise ValueError(
            f"No gold episode of the {len(tasks)} drawn tasks finished within the move limit "
            f"({(env_kwargs or {}).get('max_turns', 30)} turns); draw more tasks, pick task types with short gold paths "
            "or raise env_kwargs['max_turns']."
        )
    columns: dict[str, list] = {"task": [], "variation": [], "turn": [], "won": []}
    if format == "messages":
        columns["messages"] = []
    else:
        columns["prompt"], columns["completion"] = [], []
    for episode in episodes:
        messages = episode.messages(prompt_style)
        if format == "messages":
            rows = [(len(episode.actions), {"messages": messages})]
        elif history is not None:
            rows = [(turn, {"prompt": prompt, "completion": [answer]})
                    for turn, (prompt, answer) in enumerate(episode.windowed_turns(history, prompt_style))]
        else:
            answer_positions = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            rows = [(turn, {"prompt": messages[:i], "completion": [messages[i]]})
                    for turn, i in enumerate(answer_positions)]
        for turn, row in rows:
            columns["task"].append(episode.task.task)
            columns["variation"].append(episode.task.variation)
            columns["turn"].append(turn)
            columns["won"].append(episode.won)
            for key, value in row.items():
                columns[key].append(value)
    return Dataset.from_dict(columns)


def to_prompt_completion(dataset):
    """Turn a ``format="messages"`` expert dataset (one row per episode) into one row per turn: ``prompt`` = the
    conversation before an answer, ``completion`` = that answer (other columns are kept; `turn` is the answer's
    index)."""
    from datasets import Dataset

    if "messages" not in dataset.column_names:
        raise ValueError("to_prompt_completion needs a dataset with a `messages` column (format='messages').")
    extra = [c for c in dataset.column_names if c not in ("messages", "turn")]
    columns: dict[str, list] = {name: [] for name in (*extra, "turn", "prompt", "completion")}
    for row in dataset:
        messages = row["messages"]
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for turn, i in enumerate(answers):
            for name in extra:
                columns[name].append(row[name])
            columns["turn"].append(turn)
            columns["prompt"].append(messages[:i])
            columns["completion"].append([messages[i]])
    return Dataset.from_dict(columns)


# A ChatML chat template that renders exactly like plain ChatML but marks the assistant turns with
# {% generation %}, so TRL's SFTTrainer can train on every assistant turn of a whole episode in one sequence
# (`assistant_only_loss=True`) instead of one row per turn.
CHATML_TRAINING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
_PROBE_CONVERSATIONS = (
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
     {"role": "user", "content": "V"}],
    [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}],
)


def enable_assistant_masks(tokenizer) -> bool:
    """Whether `tokenizer`'s chat template marks assistant turns (needed by SFT's `assistant_only_loss`). A plain
    ChatML template (as `trl_epo.tiny` builds) is swapped for `CHATML_TRAINING_TEMPLATE`, which renders every
    conversation identically; any other template is left alone (returns False: train on prompt/completion rows)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return False
    if "generation" in template and "endgeneration" in template:
        return True

    def render(chat_template, messages, prompt):
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=prompt)

    try:
        same = all(render(template, m, p) == render(CHATML_TRAINING_TEMPLATE, m, p)
                   for m in _PROBE_CONVERSATIONS for p in (False, True))
    except Exception:
        return False
    if same:
        tokenizer.chat_template = CHATML_TRAINING_TEMPLATE
    return same
