"""The ALFWorld text engine: compiled games (`pddl.CompiledGame`) played through TextWorld's PDDL environment and
fast-downward, with ALFWorld's entity names (``drawer 3``).

This is the path alfworld's own ``AlfredTWEnv`` takes (``game.tw-pddl`` -> ``textworld.envs.pddl.PddlEnv`` with the
``AlfredDemangler`` naming), with the game's translation done once (see `pddl`) and one more difference, invisible
to the agent: admissible commands are formatted directly from the applicable operators. Stock TextWorld runs the
grammar's text derivation on every command template at every step (about 90% of a step's time); the result is
identical (`tests/envs/test_alfworld_engine.py` compares both on whole episodes), because templates are either plain
``{name}`` substitutions or lists over *static* facts, whose derivations are memoised per game.

Nothing here evaluates text from the agent: a command is only looked up in the list of admissible commands.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable

from .pddl import TEXT_LOCK, TRANSLATE_LOCK, CompiledGame, installed_domain_and_grammar, read_game


NOTHING_HAPPENS = "Nothing happens."  # the engine's answer to a command it does not accept
WELCOME_BANNER = "-= Welcome to TextWorld, ALFRED! =-"

_PLAIN_TEMPLATE = re.compile(r"^(?:[^\[\]{}#|]|\{\w+\})*$")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_QUERY_PREDICATE = re.compile(r"(\w+)\s*\(")
_WORD = re.compile(r"\w+")


def _make_state_class():
    from textworld.envs.pddl.logic import Atom, PddlState
    from textworld.logic import Type

    class CompiledPddlState(PddlState):
        """TextWorld's `PddlState` built from a `CompiledGame` (no translation, no planner task)."""

        def __init__(self, downward_lib, compiled: CompiledGame):  # mirrors PddlState.__init__
            self._facts = defaultdict(set)
            self._vars_by_name = {}
            self._vars_by_type = defaultdict(set)
            self._var_counts = Counter()
            self._logic = compiled.logic
            self.downward_lib = downward_lib
            self.pddl_problem = compiled.game.problem
            self._actions = compiled.schemas
            with TEXT_LOCK:  # the type hierarchy is shared by every game of the process (and by threads)
                for name, parents in compiled.types:
                    try:
                        self._logic.types.add(Type(name, parents))
                    except ValueError:
                        pass
            self.downward_lib.load_sas(compiled.sas)
            self.name2type = compiled.name2type
            self.add_facts(compiled.init_facts)
            size = self.downward_lib.get_state_size()
            atoms = (Atom * size)()
            self.downward_lib.get_state(atoms)
            self.add_facts([f for f in (a.get_fact(self.name2type) for a in atoms) if not f.is_negation])

        def replan(self, infos):  # pragma: no cover - the planner task is not loaded
            raise NotImplementedError("This engine does not load fast-downward's planner; use a walkthrough.")

    return CompiledPddlState


def _make_engine_class():
    import textworld
    from textworld.core import GameState
    from textworld.envs.pddl import PddlEnv
    from textworld.generator.game import EntityInfo

    state_class = _make_state_class()

    class AlfredPddlEngine(PddlEnv):
        """TextWorld's `PddlEnv` playing `CompiledGame`s, with ALFWorld's entity names (``drawer 3``)."""

        def __init__(self):
            super().__init__(textworld.EnvInfos(admissible_commands=True, won=True, facts=False))
            self._compiled: CompiledGame | None = None
            self._memo: dict = {}

        def load_compiled(self, compiled: CompiledGame) -> None:
            self._compiled = compiled
            self._game_data = {"pddl_problem": compiled.game.problem}
            self._game_file = compiled.game.path
            self.walkthrough = list(compiled.game.walkthrough) if compiled.game.walkthrough else None
            self._logic = compiled.logic
            self._memo = compiled.command_memo

        def reset(self):
            with TEXT_LOCK:
                return self._reset()

        def step(self, command: str):
            with TEXT_LOCK:
                return super().step(command)

        def _reset(self):
            compiled = self._compiled
            if compiled is None:
                raise RuntimeError("Load a game before resetting the engine.")
            self._pddl_state = state_class(self.downward_lib, compiled)
            if compiled.entity_infos is None:
                compiled.entity_infos = _alfred_entity_infos(self._pddl_state, EntityInfo)
            self._entity_infos = compiled.entity_infos
            self.prev_state = None
            self.state = GameState()
            self._last_action = None
            self._moves = 0
            context = {
                "state": self._pddl_state,
                "facts": list(self._pddl_state.facts),
                "variables": {},
                "mapping": {},
                "entity_infos": self._entity_infos,
            }
            self.state.feedback = self._logic.grammar.derive("#intro#", context)
            self.state.raw = self.state.feedback
            self._gather_infos()
            return self.state

        def _gather_infos(self):
            self.state["won"] = self._pddl_state.check_goal()
            self.state["lost"] = False
            self.state["_entity_infos"] = self._entity_infos
            self.state["last_action"] = None
            self.state["_last_action"] = self._last_action
            actions = list(self._pddl_state.all_applicable_actions())
            self.state["_valid_actions"] = actions
            self.state["_valid_commands"] = [self._command(action) for action in actions]
            self.state["admissible_commands"] = sorted(set(self.state["_valid_commands"]))

        def _command(self, action) -> str:
            template = action.command_template
            names = {ph.name: self._entity_infos[var.name].name for ph, var in action.mapping.items()}
            if _PLAIN_TEMPLATE.match(template):
                return _PLACEHOLDER.sub(lambda m: names[m.group(1)], template)
            key = None
            if all(p.lower() in self._compiled.static_predicates for p in _QUERY_PREDICATE.findall(template)):
                # Over static facts the derivation depends only on the variables the template mentions (e.g. not on
                # where the agent stands for "go to [{r.name | receptacleatlocation(r, lend)}]").
                mentioned = set(_WORD.findall(template))
                key = (
                    template,
                    tuple(sorted((ph.name, var.name) for ph, var in action.mapping.items() if ph.name in mentioned)),
                )
                if key in self._memo:
                    return self._memo[key]
            context = {
                "state": self._pddl_state,
                "facts": None,
                "mapping": action.mapping,
                "variables": {ph.name: self._entity_infos[var.name] for ph, var in action.mapping.items()},
                "entity_infos": self._entity_infos,
            }
            derived = self._logic.grammar.derive(template, context)
            command = (
                derived.format(**{k: info.name for k, info in self._entity_infos.items()})
                if "{" in derived
                else derived
            )
            if key is not None:
                self._memo[key] = command
            return command

        def facts(self) -> list:
            return list(self._pddl_state.facts)

    return AlfredPddlEngine


def _alfred_entity_infos(state, entity_info_class) -> dict:
    """Entity infos named as ALFWorld names them (alfworld's `Demangler`: ``Drawer|+01.58|...`` -> ``drawer 3``)."""
    from alfworld.agents.utils.misc import Demangler

    infos = {v.name: entity_info_class(v.name, v.type) for fact in state.facts for v in fact.arguments}
    for info in infos.values():
        info.name = info.id
        info.definite = "the"
        info.indefinite = "a"
    demangler = Demangler(game_infos=infos, shuffle=False)
    for info in infos.values():
        info.name = demangler.demangle_alfred_name(info.id)
    return infos


_ENGINE_CLASS = None


def new_engine():
    """A fresh engine (it holds its own copy of fast-downward's library)."""
    global _ENGINE_CLASS
    with TRANSLATE_LOCK:
        if _ENGINE_CLASS is None:
            _ENGINE_CLASS = _make_engine_class()
    return _ENGINE_CLASS()


def stock_engine_play(path: str, commands: Iterable[str]) -> list[tuple[str, list[str], bool]]:
    """Play a game with stock TextWorld (`PddlEnv` + alfworld's `AlfredDemangler`, installed domain and grammar):
    ``[(feedback, admissible_commands, won), ...]`` for the reset and each command. Slow; used to check the engine."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs.pddl import PddlEnv

    game = read_game(path)
    domain, grammar = installed_domain_and_grammar()
    with open(path) as f:
        data = json.load(f)
    data["pddl_domain"] = domain
    data["grammar"] = grammar.replace("Your task is to: UNKNOWN GOAL.", f"Your task is to: {game.task_sentence}")
    env = AlfredDemangler(PddlEnv(textworld.EnvInfos(admissible_commands=True, won=True)))
    argv = sys.argv
    try:
        with TRANSLATE_LOCK, TEXT_LOCK:
            env.load(data)
            state = env.reset()
        out = [(state.feedback, list(state.admissible_commands), bool(state["won"]))]
        for command in commands:
            with TEXT_LOCK:
                state, _, _ = env.step(command)
            out.append((state.feedback, list(state.admissible_commands), bool(state["won"])))
    finally:
        sys.argv = argv
        env.close()
    return out
