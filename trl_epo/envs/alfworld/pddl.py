"""ALFWorld game files and their PDDL: what a game directory holds, the installed alfworld release's domain and
grammar, and the PDDL -> SAS translation done once per game (`CompiledGame`, kept in a `CompiledGameCache`).

Game files made by older alfworld releases embed an older domain and grammar (e.g. ``put X in/on Y`` instead of
``move X to Y``). A game's *problem* and *task sentence* are kept; the domain and grammar are always the installed
release's (``alfworld/data/alfred.pddl`` and ``alfred.twl2``), so every game speaks the same command language. The
grammar is parsed once per process and each game translated once (stock TextWorld re-parses the grammar on every
load and translates the problem twice on every reset, a second time for its planner, which nothing here uses).
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any


GAME_FILE = "game.tw-pddl"
TRAJ_FILE = "traj_data.json"

# The six ALFWorld task types (official names, as in the game directories), and the short names also accepted.
TASK_TYPES = (
    "pick_and_place_simple",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "look_at_obj_in_light",
    "pick_two_obj_and_place",
)
TASK_TYPE_ALIASES = {
    "pick_and_place": "pick_and_place_simple",
    "pick_clean_then_place": "pick_clean_then_place_in_recep",
    "pick_heat_then_place": "pick_heat_then_place_in_recep",
    "pick_cool_then_place": "pick_cool_then_place_in_recep",
    "look_at_obj_in_light": "look_at_obj_in_light",
    "pick_two_obj_and_place": "pick_two_obj_and_place",
}

_TASK_LINE = re.compile(r'Your task is to: ((?:[^"\\]|\\.)*)"')


def canonical_task_type(name: str) -> str:
    """The official task-type name for an official or short name (``pick_and_place`` -> ``pick_and_place_simple``)."""
    if name in TASK_TYPES:
        return name
    if name in TASK_TYPE_ALIASES:
        return TASK_TYPE_ALIASES[name]
    raise ValueError(
        f"Unknown ALFWorld task type {name!r}; use one of {list(TASK_TYPES)} or the short names "
        f"{list(TASK_TYPE_ALIASES)}."
    )


def installed_domain_and_grammar() -> tuple[str, str]:
    """The text of the installed alfworld release's PDDL domain and TextWorld grammar."""
    try:
        from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "ALFWorld needs the `alfworld` and `textworld[pddl]` packages: pip install 'trl-epo[alfworld]'."
        ) from error
    with open(ALFRED_PDDL_PATH) as f:
        domain = f.read()
    with open(ALFRED_TWL2_PATH) as f:
        grammar = f.read()
    return domain, grammar


# --------------------------------------------------------------------------------------------------------------------
# Game files
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GameFile:
    """What a game directory holds (``game.tw-pddl`` and, next to it, ``traj_data.json``).

    Attributes:
        path: the ``game.tw-pddl`` file.
        problem: the PDDL problem (initial state and goal).
        task_sentence: the goal as the game states it, e.g. ``"put some pencil on dresser."``.
        task_type: the ALFWorld task type (from ``traj_data.json``), or None.
        params: ``traj_data.json``'s ``pddl_params`` (``object_target``, ``parent_target``, ``toggle_target``, ...).
        walkthrough: a winning command sequence when the file carries one (generated games do), else None.
        solvable: the file's ``solvable`` flag (None when absent).
    """

    path: str
    problem: str
    task_sentence: str
    task_type: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    walkthrough: tuple[str, ...] | None = None
    solvable: bool | None = None
    scene: str | None = None


def read_game(path: str | os.PathLike) -> GameFile:
    """Read a ``game.tw-pddl`` file (and the ``traj_data.json`` next to it, when present)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ALFWorld game file not found: {path}")
    with open(path) as f:
        data = json.load(f)
    if "pddl_problem" not in data:
        raise ValueError(f"{path} is not an ALFWorld game file (it has no 'pddl_problem').")
    traj: dict[str, Any] = {}
    traj_path = os.path.join(os.path.dirname(path), TRAJ_FILE)
    if os.path.isfile(traj_path):
        with open(traj_path) as f:
            traj = json.load(f)
    sentence = task_sentence_from_grammar(data.get("grammar", ""))
    if sentence is None:
        raise ValueError(
            f"{path}: its grammar states no task ('Your task is to: ...'). Regenerate the game with "
            "`trl-epo-alfworld-games` or alfworld's own tools."
        )
    walkthrough = data.get("walkthrough")
    return GameFile(
        path=path,
        problem=data["pddl_problem"],
        task_sentence=sentence,
        task_type=traj.get("task_type"),
        params=dict(traj.get("pddl_params") or {}),
        walkthrough=tuple(walkthrough) if walkthrough else None,
        solvable=data.get("solvable"),
        scene=(traj.get("scene") or {}).get("floor_plan"),
    )


def task_sentence_from_grammar(grammar: str) -> str | None:
    """The task sentence a game's grammar states (``"Your task is to: <sentence>"``), or None."""
    match = _TASK_LINE.search(grammar or "")
    if not match:
        return None
    sentence = json.loads(f'"{match.group(1)}"').strip()
    if not sentence or "UNKNOWN GOAL" in sentence:
        return None
    return sentence


# --------------------------------------------------------------------------------------------------------------------
# Grammar (parsed once per process) and translation (once per game)
# --------------------------------------------------------------------------------------------------------------------

# Two process-wide locks make envs in threads of one process safe (the `EnvPool` thread backend):
# fast-downward's translator keeps global state (and rebinds sys.argv / sys.stdout), and TextWorld's text grammar
# runs on module-level TatSu parsers that are not thread-safe. Translation (the slow part of a reset, and what a
# background prefetch does) and text derivation (every step) take different locks, so a prefetch never blocks a step.
TRANSLATE_LOCK = threading.RLock()  # fast-downward's translator and the process-wide caches
TEXT_LOCK = threading.RLock()  # TextWorld's grammar parsing / derivation and the shared type hierarchy
_BASE_LOGIC = None


def _base_logic():
    """The installed domain + grammar as a TextWorld PDDL `GameLogic`, parsed once per process."""
    global _BASE_LOGIC
    with TEXT_LOCK:
        if _BASE_LOGIC is None:
            from textworld.envs.pddl.logic import GameLogic

            domain, grammar = installed_domain_and_grammar()
            _BASE_LOGIC = GameLogic(domain=domain, grammar=grammar)
        return _BASE_LOGIC


def game_logic(task_sentence: str):
    """The installed logic with this game's task sentence in the grammar's ``task`` rule (the sentence is plain text,
    never parsed as grammar)."""
    from textworld.envs.pddl.textgen import ContextSensitiveGrammar, ProductionRule, TerminalSymbol

    base = _base_logic()
    logic = copy.copy(base)  # shares the parsed actions and the type hierarchy (the same for every game)
    grammar = ContextSensitiveGrammar()
    grammar._rules = defaultdict(list, {name: list(rules) for name, rules in base.grammar._rules.items()})
    grammar._rules["task"] = [ProductionRule(lhs="task", rhs=[TerminalSymbol(f"Your task is to: {task_sentence}")])]
    logic.grammar = grammar
    return logic


def translate(domain: str, problem: str):
    """fast-downward's PDDL -> SAS translation (unoptimised: every operator and fact is kept, as TextWorld needs).

    The translator keeps global state, rebinds ``sys.argv`` and captures ``sys.stdout``: calls are serialised and
    ``sys.argv`` is restored.
    """
    import fast_downward

    with TRANSLATE_LOCK:
        argv = sys.argv
        try:
            return fast_downward.pddl2sas(domain, problem)
        finally:
            sys.argv = argv


@dataclass
class _Schema:
    """The parameters of one action schema, as `PddlState.all_applicable_actions` reads them."""

    name: str
    parameters: list


@dataclass
class _Parameter:
    name: str
    type_name: str


@dataclass
class CompiledGame:
    """A game ready to reset in an engine: its logic, its SAS task and its initial facts."""

    game: GameFile
    logic: Any
    sas: bytes
    init_facts: list
    name2type: dict[str, str]
    schemas: dict[str, _Schema]
    types: list[tuple[str, list[str]]]
    static_predicates: frozenset[str]
    entity_infos: dict | None = None  # set by the first reset (names come from the demangler over all entities)
    command_memo: dict = field(default_factory=dict)  # derivations of command templates over static facts


def compile_game(game: GameFile) -> CompiledGame:
    """Translate a game once: the work every reset would otherwise repeat."""
    from fast_downward.translate.pddl import conditions, f_expression
    from textworld.logic import Proposition, Variable

    domain, _ = installed_domain_and_grammar()
    logic = game_logic(game.task_sentence)
    task, sas = translate(domain, game.problem)
    name2type = {o.name: o.type_name for o in task.objects}

    init_facts = []
    for atom in task.init:  # the same conversion as TextWorld's PddlState
        if isinstance(atom, conditions.Atom):
            if atom.predicate == "=":
                continue
            init_facts.append(Proposition(atom.predicate, [Variable(a, name2type[a]) for a in atom.args]))
        elif isinstance(atom, f_expression.Assign):
            if atom.fluent.symbol == "total-cost":
                continue
            name = f"{atom.expression.value}"
            if str.isdigit(name):
                continue
            init_facts.append(Proposition(name, [Variable(a, name2type[a]) for a in atom.fluent.args]))

    schemas = {
        action.name: _Schema(action.name, [_Parameter(p.name, p.type_name) for p in action.parameters])
        for action in task.actions
    }
    fluents = set()
    for action in task.actions:
        for effect in action.effects:
            literal = getattr(effect, "literal", None)
            if literal is not None:
                fluents.add(literal.predicate.lower())
    predicates = {fact.name.lower() for fact in init_facts} | {p.name.lower() for p in task.predicates}
    return CompiledGame(
        game=game,
        logic=logic,
        sas=sas.encode("utf-8"),
        init_facts=init_facts,
        name2type=name2type,
        schemas=schemas,
        types=[(t.name, list(t.supertype_names)) for t in task.types],
        static_predicates=frozenset(predicates - fluents),
    )


class CompiledGameCache:
    """A small LRU cache of compiled games, keyed by game file path (and its modification time)."""

    def __init__(self, max_size: int = 32):
        self.max_size = max_size
        self._items: OrderedDict[tuple, CompiledGame] = OrderedDict()
        self._pending: dict[tuple, threading.Event] = {}
        self._lock = threading.Lock()
        self.hits = 0  # resets served from the cache
        self.misses = 0  # resets that had to translate their game
        self.prefetched = 0  # games translated ahead of need

    @staticmethod
    def key(path: str) -> tuple:
        path = os.path.abspath(path)
        return (path, os.stat(path).st_mtime_ns)

    def get(self, path: str) -> CompiledGame:
        """The compiled game (compiled now unless cached, or waiting for a prefetch of the same game)."""
        key = self.key(path)
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    self.hits += 1
                    return self._items[key]
                pending = self._pending.get(key)
                if pending is None:
                    self._pending[key] = threading.Event()
                    self.misses += 1
                    break
            pending.wait()  # a prefetch of this game is under way; then look again
        return self._compile(key, path)

    def prefetch(self, path: str) -> bool:
        """Compile a game into the cache (called from a background thread). False if it was already there."""
        key = self.key(path)
        with self._lock:
            if key in self._items or key in self._pending:
                return False
            self._pending[key] = threading.Event()
            self.prefetched += 1
        self._compile(key, path)
        return True

    def _compile(self, key: tuple, path: str) -> CompiledGame:
        try:
            compiled = compile_game(read_game(path))
            with self._lock:
                self._items[key] = compiled
                self._items.move_to_end(key)
                while len(self._items) > self.max_size:
                    self._items.popitem(last=False)
            return compiled
        finally:
            with self._lock:
                self._pending.pop(key).set()

    def __contains__(self, path: str) -> bool:
        with self._lock:
            return self.key(path) in self._items
