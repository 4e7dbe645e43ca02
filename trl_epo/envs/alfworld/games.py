"""Generate solvable ALFWorld games offline, one at a time: a game is a pure function of (seed, split, task type,
index). Writing them in the official ``json_2.1.1`` layout, and the ``trl-epo-alfworld-games`` command, are
`game_writer`'s.

The official games come from ``alfworld-download`` (internet). These games are built from what the ``alfworld``
wheel ships: the floor plans (`scenes`), the goal library (``alfworld.gen.goal_library``: PDDL goals and task
sentences), and the domain and grammar (``alfworld/data``).

A game: a scene, its receptacles at their locations, 1-3 instances of each object type of the scene placed in
receptacles that can hold them, the agent somewhere in the middle of the room, and a goal of one of the six task
types. Each game comes with a walkthrough written by the expert planner (`planner`) and is kept only if

* the goal does not already hold at reset (checked by the engine's goal check), and
* replaying the walkthrough through the real engine wins, every command being admissible, within 50 turns.

Known pitfalls handled: "go to X" is not admissible when the agent already stands at X's location (the expert skips
it); target objects are never placed in a receptacle of the goal's type (else the goal could hold at reset); look-at
tasks use desk lamps standing on furniture (a floor lamp is in no receptacle, so "use" is never admissible: those tasks
are unsolvable); no planner is run (fast-downward can take ~80 s on pick-two games).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .engine import new_engine
from .pddl import GameFile, canonical_task_type, compile_game, installed_domain_and_grammar
from .planner import ExpertError, SceneFacts, expert_plan
from .scenes import (
    LAMP_HOSTS,
    Receptacle,
    Scene,
    alfworld_constants,
    coordinates,
    location_name,
    static_receptacle_types,
    task_choices,
    usable_scenes,
)


GENERATOR_VERSION = 1
MAX_TURNS = 50
MAX_ATTEMPTS = 50


class GenerationError(RuntimeError):
    """No valid game could be drawn (e.g. no scene offers what the task type needs)."""


@dataclass
class GeneratedGame:
    """A generated game: what goes into ``game.tw-pddl`` and ``traj_data.json``."""

    task_type: str
    split: str
    scene: int
    params: dict[str, Any]
    task_sentence: str
    problem: str
    walkthrough: list[str]
    trial: str
    seed: int
    index: int
    attempts: int = 1
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def task_dir(self) -> str:
        p = self.params
        parent = p["parent_target"] or p["toggle_target"]
        return f"{self.task_type}-{p['object_target']}-None-{parent}-{self.scene}"

    def relative_dir(self) -> str:
        return os.path.join(self.split, self.task_dir, self.trial)

    def game_json(self) -> dict[str, Any]:
        domain, grammar = installed_domain_and_grammar()
        return {
            "pddl_domain": domain,
            "grammar": grammar.replace("Your task is to: UNKNOWN GOAL.", f"Your task is to: {self.task_sentence}"),
            "pddl_problem": self.problem,
            "solvable": True,
            "walkthrough": list(self.walkthrough),
        }

    def traj_json(self) -> dict[str, Any]:
        return {
            "task_id": self.trial,
            "task_type": self.task_type,
            "pddl_params": dict(self.params),
            "scene": {"floor_plan": f"FloorPlan{self.scene}", "scene_num": self.scene, "random_seed": self.seed},
            "turk_annotations": {
                "anns": [
                    {
                        "task_desc": self.task_sentence.rstrip("."),
                        "high_descs": [],
                        "votes": [],
                        "assignment_id": "generated",
                    }
                ]
            },
            "plan": {"high_pddl": [], "low_actions": []},
            "generator": {
                "name": "trl_epo.envs.alfworld.games",
                "version": GENERATOR_VERSION,
                "seed": self.seed,
                "split": self.split,
                "index": self.index,
            },
        }


def _rng(seed: int, split: str, task_type: str, index: int, attempt: int) -> random.Random:
    # The seed string keeps the module's old name: changing it would change every generated game.
    return random.Random(f"trl_epo.alfworld_games/v{GENERATOR_VERSION}/{seed}/{split}/{task_type}/{index}/{attempt}")


def _mangle(thor_id: str) -> str:
    """AI2-THOR id -> PDDL name, as ALFWorld writes them (alfworld's demangler reverses it)."""
    for old, new in (("|", "_bar_"), ("-", "_minus_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        thor_id = thor_id.replace(old, new)
    return thor_id


def _mangle_location(location: str) -> str:
    return _mangle(location)


@dataclass
class _Draft:
    """A scene being populated: object instances and where they are."""

    scene: Scene
    start: str
    placements: list[tuple[str, str, Receptacle]]  # (object id, object type, receptacle)
    lamps: list[tuple[str, Receptacle]]
    params: dict[str, Any]
    task_sentence: str


def _draft(scene: Scene, task_type: str, rng: random.Random) -> _Draft:
    c = alfworld_constants()
    task_type = canonical_task_type(task_type)
    choices = task_choices(scene, task_type)
    if not choices:
        raise GenerationError(f"FloorPlan{scene.number} offers no {task_type} task.")
    obj_type, parent = rng.choice(choices)
    look_at = task_type == "look_at_obj_in_light"
    params = {
        "object_target": obj_type,
        "parent_target": "" if look_at else parent,
        "toggle_target": parent if look_at else "",
        "mrecep_target": "",
        "object_sliced": False,
    }
    from alfworld.gen import goal_library

    template = rng.choice(goal_library.gdict[task_type]["templates"])
    sentence = template.format(obj=obj_type.lower(), recep=parent.lower(), toggle=parent.lower(), mrecep="") + "."

    receptacles = list(scene.receptacles)
    used_ids: set[str] = {r.id for r in receptacles}
    placements: list[tuple[str, str, Receptacle]] = []

    def new_id(otype: str, receptacle: Receptacle) -> str:
        x, y, z = coordinates(receptacle.id)
        while True:
            thor_id = (
                f"{otype}|{x + rng.uniform(-0.3, 0.3):+06.2f}|{y + rng.uniform(0.0, 0.4):+06.2f}"
                f"|{z + rng.uniform(-0.3, 0.3):+06.2f}"
            )
            if thor_id not in used_ids:
                used_ids.add(thor_id)
                return thor_id

    for otype in scene.object_types:
        holders = [r for r in receptacles if otype in c.VAL_RECEPTACLE_OBJECTS.get(r.type, ())]
        if otype == obj_type and not look_at:
            holders = [r for r in holders if r.type != parent]  # the goal must not hold at reset
        if not holders:
            continue
        count = rng.randint(1, c.MAX_NUM_OF_OBJ_INSTANCES)
        if otype == obj_type and task_type == "pick_two_obj_and_place":
            count = max(2, count)
        for _ in range(count):
            receptacle = rng.choice(holders)
            placements.append((new_id(otype, receptacle), otype, receptacle))

    lamps: list[tuple[str, Receptacle]] = []
    if scene.has_desk_lamp:
        hosts = [r for r in receptacles if r.type in LAMP_HOSTS]
        if hosts:
            host = rng.choice(hosts)
            lamps.append((new_id("DeskLamp", host), host))

    taken = {r.location for r in receptacles}
    for _ in range(100):
        x, z = rng.choice(scene.floor_points)
        start = location_name(x, z, rng.randrange(4) * 90, 30)
        if start not in taken:
            break
    else:
        raise GenerationError(f"FloorPlan{scene.number}: no free floor point for the agent.")
    return _Draft(scene, start, placements, lamps, params, sentence)


def _problem(draft: _Draft, task_type: str, name: str) -> str:
    """The PDDL problem of a draft, in the layout of ALFWorld's own problems."""
    from alfworld.gen import goal_library

    c = alfworld_constants()
    static = static_receptacle_types()
    otypes = sorted((set(c.OBJECTS) | set(c.MOVABLE_RECEPTACLES)) - static)
    rtypes = sorted(static)
    scene = draft.scene
    objects = [(_mangle(oid), otype, r) for oid, otype, r in draft.placements]
    lamps = [(_mangle(lid), r) for lid, r in draft.lamps]
    receptacles = [(_mangle(r.id), r) for r in scene.receptacles]
    locations = sorted({_mangle_location(r.location) for r in scene.receptacles} | {_mangle_location(draft.start)})

    declare = ["agent1 - agent"]
    declare += [f"{t}Type - otype" for t in otypes]
    declare += [f"{t}Type - rtype" for t in rtypes]
    declare += [f"{n} - object" for n, _, _ in objects] + [f"{n} - object" for n, _ in lamps]
    declare += [f"{n} - receptacle" for n, _ in receptacles]
    declare += [f"{loc} - location" for loc in locations]

    init = [f"(atLocation agent1 {_mangle_location(draft.start)})"]
    for n, r in receptacles:
        init.append(f"(receptacleType {n} {r.type}Type)")
        init.append(f"(receptacleAtLocation {n} {_mangle_location(r.location)})")
        if r.type in c.OPENABLE_CLASS_SET:
            init.append(f"(openable {n})")
    actions = c.VAL_ACTION_OBJECTS
    for n, otype, r in objects:
        init.append(f"(objectType {n} {otype}Type)")
        init.append(f"(pickupable {n})")
        if otype in c.MOVABLE_RECEPTACLES_SET:
            init.append(f"(isReceptacleObject {n})")
        for ability, predicate in (
            ("Cleanable", "cleanable"),
            ("Heatable", "heatable"),
            ("Coolable", "coolable"),
            ("Sliceable", "sliceable"),
        ):
            if otype in actions[ability]:
                init.append(f"({predicate} {n})")
        init.append(f"(inReceptacle {n} {_mangle(r.id)})")
        init.append(f"(objectAtLocation {n} {_mangle_location(r.location)})")
    for n, r in lamps:
        init.append(f"(objectType {n} DeskLampType)")
        init.append(f"(toggleable {n})")
        init.append(f"(inReceptacle {n} {_mangle(r.id)})")
        init.append(f"(objectAtLocation {n} {_mangle_location(r.location)})")
    for rtype in rtypes:
        for otype in sorted(c.VAL_RECEPTACLE_OBJECTS.get(rtype, ())):
            if otype in otypes:
                init.append(f"(canContain {rtype}Type {otype}Type)")

    p = draft.params
    goal = (
        goal_library.gdict[task_type]["pddl"]
        .format(obj=p["object_target"], recep=p["parent_target"], toggle=p["toggle_target"], mrecep=p["mrecep_target"])
        .replace("#", "-")
    )
    return (
        f"\n(define (problem plan_{name})\n(:domain alfred)\n(:objects\n        "
        + "\n        ".join(declare)
        + "\n        )\n\n(:init\n        "
        + "\n        ".join(init)
        + "\n        )\n\n"
        + goal
    )


def _verify(game: GameFile) -> tuple[list[str], dict[str, Any]]:
    """Play the game in the real engine: the goal must not hold at reset, and the expert's plan must win with
    every command admissible. Returns the walkthrough and some stats."""
    compiled = compile_game(game)
    engine = new_engine()
    try:
        engine.load_compiled(compiled)
        state = engine.reset()
        if state["won"]:
            raise ExpertError("the goal already holds at reset")
        names = {k: info.name for k, info in engine._entity_infos.items()}
        plan = expert_plan(SceneFacts.from_facts(engine.facts(), names), game.task_type, game.params)
        if len(plan) > MAX_TURNS:
            raise ExpertError(f"the walkthrough needs {len(plan)} > {MAX_TURNS} turns")
        state = engine.reset()
        for turn, command in enumerate(plan):
            if state["won"]:
                raise ExpertError(f"won before the end of the walkthrough (turn {turn})")
            if command not in state["_valid_commands"]:
                raise ExpertError(f"walkthrough command {command!r} is not admissible at turn {turn}")
            state, _, _ = engine.step(command)
        if not state["won"]:
            raise ExpertError("the walkthrough does not win")
        return plan, {"entities": len(names)}
    finally:
        engine.close()


def generate_game(task_type: str, split: str = "train", seed: int = 0, index: int = 0) -> GeneratedGame:
    """One verified game (a pure function of its arguments). Raises `GenerationError` after `MAX_ATTEMPTS` failed
    draws."""
    task_type = canonical_task_type(task_type)
    scenes = usable_scenes(task_type, split)
    if not scenes:
        raise GenerationError(f"No {split} scene supports {task_type}.")
    errors = Counter()
    for attempt in range(MAX_ATTEMPTS):
        rng = _rng(seed, split, task_type, index, attempt)
        scene = rng.choice(scenes)
        trial = f"trial_G{GENERATOR_VERSION}_s{seed}_{index:06d}"
        try:
            draft = _draft(scene, task_type, rng)
            problem = _problem(draft, task_type, trial)
            game = GameFile(
                path=f"<generated {trial}>",
                problem=problem,
                task_sentence=draft.task_sentence,
                task_type=task_type,
                params=draft.params,
            )
            walkthrough, stats = _verify(game)
        except (GenerationError, ExpertError) as error:
            errors[str(error).split(":")[0]] += 1
            continue
        return GeneratedGame(
            task_type,
            split,
            scene.number,
            draft.params,
            draft.task_sentence,
            problem,
            walkthrough,
            trial,
            seed,
            index,
            attempts=attempt + 1,
            stats=stats,
        )
    raise GenerationError(f"No valid {task_type} game in {MAX_ATTEMPTS} draws ({dict(errors)}).")
