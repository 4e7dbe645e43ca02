"""Generate solvable ALFWorld games offline, in the official ``json_2.1.1`` layout.

The official games come from ``alfworld-download`` (internet). This module writes games of the same format from what
the ``alfworld`` wheel ships: the floor-plan layouts (``alfworld/gen/layouts``: the receptacles of each of the 120
AI2-THOR scenes with their viewing poses, the object types present, the reachable floor points), the object/receptacle
affordances (``alfworld.gen.constants``), the goal library (``alfworld.gen.goal_library``: PDDL goals and task
sentences), and the domain and grammar (``alfworld/data``).

A game: a scene, its receptacles at their locations, 1-3 instances of each object type of the scene placed in
receptacles that can hold them, the agent somewhere in the middle of the room, and a goal of one of the six task
types. Each game comes with a walkthrough written by the constructive expert (`alfworld_expert`) and is kept only if

* the goal does not already hold at reset (checked by the engine's goal check), and
* replaying the walkthrough through the real engine wins, every command being admissible, within 50 turns.

Known pitfalls handled: "go to X" is not admissible when the agent already stands at X's location (the expert skips
it); target objects are never placed in a receptacle of the goal's type (else the goal could hold at reset); look-at
tasks use desk lamps standing on furniture (a floor lamp is in no receptacle, so "use" is never admissible: those tasks
are unsolvable); no planner is run (fast-downward can take ~80 s on pick-two games). The valid_unseen scenes (10,
219, 308, 424) are never used for train or valid_seen games; valid_unseen games use only them.

Deterministic: a game is a pure function of (seed, split, task type, index).

Command line::

    trl-epo-alfworld-games --out data/alfworld --split train --per-type 100 --workers 8
    trl-epo-alfworld-games --out data/alfworld --split valid_unseen --per-type 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .alfworld_engine import (
    GAME_FILE,
    TASK_TYPES,
    TRAJ_FILE,
    GameFile,
    canonical_task_type,
    compile_game,
    installed_domain_and_grammar,
    new_engine,
)
from .alfworld_expert import ExpertError, SceneFacts, expert_plan


GENERATOR_VERSION = 1
UNSEEN_SCENES = (10, 219, 308, 424)  # ALFWorld's valid_unseen floor plans: never in generated train/valid_seen games
SPLITS = ("train", "valid_seen", "valid_unseen")
MAX_TURNS = 50
MAX_ATTEMPTS = 50
# Receptacle types a desk lamp can stand on (it must be *in* a receptacle for "use" to be admissible).
LAMP_HOSTS = ("Desk", "SideTable", "Dresser", "Shelf", "CoffeeTable", "DiningTable", "TVStand")
# The appliance a task type needs (and which therefore is not its target receptacle).
APPLIANCES = {
    "pick_clean_then_place_in_recep": ("Cleanable", "SinkBasin"),
    "pick_heat_then_place_in_recep": ("Heatable", "Microwave"),
    "pick_cool_then_place_in_recep": ("Coolable", "Fridge"),
}


class GenerationError(RuntimeError):
    """No valid game could be drawn (e.g. no scene offers what the task type needs)."""


# --------------------------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Receptacle:
    id: str  # AI2-THOR style id, e.g. "Drawer|+01.58|+00.17|+02.14"
    type: str
    location: str  # e.g. "loc|2|5|1|30"


@dataclass(frozen=True)
class Scene:
    number: int
    room_type: str
    receptacles: tuple[Receptacle, ...]
    object_types: tuple[str, ...]  # types of the scene's objects that can be placed in receptacles
    has_desk_lamp: bool
    floor_points: tuple[tuple[float, float], ...]

    def receptacle_types(self) -> set[str]:
        return {r.type for r in self.receptacles}


def _constants():
    import alfworld.gen.constants as constants

    return constants


def _layouts_dir() -> str:
    import alfworld.gen

    return os.path.join(os.path.dirname(alfworld.gen.__file__), "layouts")


def static_receptacle_types() -> set[str]:
    c = _constants()
    return set(c.RECEPTACLES) - set(c.MOVABLE_RECEPTACLES)


def placeable_object_types() -> set[str]:
    """Object types that some static receptacle can hold (pickupable things), sliced variants excluded."""
    c = _constants()
    static = static_receptacle_types()
    types = set()
    for rtype, objects in c.VAL_RECEPTACLE_OBJECTS.items():
        if rtype in static:
            types |= {o for o in objects if not o.endswith("Sliced")}
    return types


def _location(x: float, z: float, rotation: float, horizon: float) -> str:
    return f"loc|{round(x / 0.25)}|{round(z / 0.25)}|{int(rotation) // 90 % 4}|{int(horizon)}"


def _coordinates(thor_id: str) -> tuple[float, float, float]:
    parts = thor_id.split("|")
    try:
        return float(parts[1]), float(parts[2]), float(parts[3])
    except (IndexError, ValueError):
        return 0.0, 0.0, 0.0


def scene_numbers(split: str) -> list[int]:
    """The floor plans of a split: seen scenes (ALFRED's training floor plans minus the unseen four) for train and
    valid_seen, the four unseen ones for valid_unseen."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
    if split == "valid_unseen":
        return list(UNSEEN_SCENES)
    return sorted(n for n in _constants().TRAIN_SCENE_NUMBERS if n not in UNSEEN_SCENES)


@lru_cache(maxsize=None)
def load_scene(number: int) -> Scene:
    """A floor plan from the layouts shipped in the alfworld wheel."""
    import numpy as np

    c = _constants()
    base = os.path.join(_layouts_dir(), f"FloorPlan{number}")
    with open(f"{base}-objects.json") as f:
        present = json.load(f)
    with open(f"{base}-openable.json") as f:
        poses = json.load(f)
    points = np.load(f"{base}-layout.npy")
    room_type = next(name for name, numbers in c.SCENE_TYPE.items() if number in numbers)
    static = static_receptacle_types()
    receptacles = []
    for thor_id, (x, z, rotation, horizon) in sorted(poses.items()):
        rtype = thor_id.split("|", 1)[0]
        if rtype in ("Sink", "Bathtub"):  # the basin is the receptacle (AI2-THOR: "Sink|...|SinkBasin")
            rtype += "Basin"
            thor_id = f"{thor_id}|{rtype}"
        if rtype in static:
            receptacles.append(Receptacle(thor_id, rtype, _location(x, z, rotation, horizon)))
    floor_points = tuple((float(x), float(z)) for x, z in points.tolist())
    # Receptacles the scene has but whose viewing pose is not in the layout file: placed at a floor point, drawn by a
    # generator seeded with the scene number (so a scene is the same in every game).
    rng = random.Random(f"scene/{number}")
    have = {r.type for r in receptacles}
    for rtype in sorted(set(present) & static - have):
        for _ in range(rng.randint(2, 4) if rtype == "StoveBurner" else 1):
            x, z = rng.choice(floor_points)
            thor_id = f"{rtype}|{x:+06.2f}|{rng.uniform(0, 1.5):+06.2f}|{z:+06.2f}"
            receptacles.append(Receptacle(thor_id, rtype, _location(x, z, rng.randrange(4) * 90, 30)))
    placeable = placeable_object_types()
    objects = tuple(sorted(t for t in set(present) if t in placeable))
    return Scene(number, room_type, tuple(receptacles), objects, "DeskLamp" in present, floor_points)


# --------------------------------------------------------------------------------------------------------------------
# Games
# --------------------------------------------------------------------------------------------------------------------


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
            "turk_annotations": {"anns": [{"task_desc": self.task_sentence.rstrip("."), "high_descs": [],
                                           "votes": [], "assignment_id": "generated"}]},
            "plan": {"high_pddl": [], "low_actions": []},
            "generator": {"name": "trl_epo.envs.alfworld_games", "version": GENERATOR_VERSION, "seed": self.seed,
                          "split": self.split, "index": self.index},
        }


def _rng(seed: int, split: str, task_type: str, index: int, attempt: int) -> random.Random:
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


def _usable_scenes(task_type: str, split: str) -> list[Scene]:
    c = _constants()
    task_type = canonical_task_type(task_type)
    rooms = c.GOALS_VALID[task_type]
    scenes = []
    for number in scene_numbers(split):
        scene = load_scene(number)
        if scene.room_type not in rooms:
            continue
        kinds = scene.receptacle_types()
        if task_type in APPLIANCES and APPLIANCES[task_type][1] not in kinds:
            continue
        if task_type == "look_at_obj_in_light" and not (scene.has_desk_lamp and kinds & set(LAMP_HOSTS)):
            continue
        scenes.append(scene)
    return scenes


def _task_choices(scene: Scene, task_type: str) -> list[tuple[str, str]]:
    """(object type, parent type) pairs this scene offers for the task type (parent = toggle for look-at)."""
    c = _constants()
    kinds = scene.receptacle_types()
    holders = {o: {r for r in kinds if o in c.VAL_RECEPTACLE_OBJECTS.get(r, ())} for o in scene.object_types}
    choices = []
    for obj in scene.object_types:
        if not holders[obj]:
            continue
        if task_type == "look_at_obj_in_light":
            choices.append((obj, "DeskLamp"))
            continue
        if task_type in APPLIANCES:
            ability, appliance = APPLIANCES[task_type]
            if obj not in c.VAL_ACTION_OBJECTS[ability]:
                continue
        else:
            appliance = None
        for parent in sorted(holders[obj]):
            if parent == appliance:
                continue
            if holders[obj] - {parent}:  # somewhere else to start from, so the goal does not hold at reset
                choices.append((obj, parent))
    return choices


def _draft(scene: Scene, task_type: str, rng: random.Random) -> _Draft:
    c = _constants()
    task_type = canonical_task_type(task_type)
    choices = _task_choices(scene, task_type)
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
    import alfworld.gen.goal_library as goal_library

    template = rng.choice(goal_library.gdict[task_type]["templates"])
    sentence = template.format(obj=obj_type.lower(), recep=parent.lower(), toggle=parent.lower(), mrecep="") + "."

    receptacles = list(scene.receptacles)
    used_ids: set[str] = {r.id for r in receptacles}
    placements: list[tuple[str, str, Receptacle]] = []

    def new_id(otype: str, receptacle: Receptacle) -> str:
        x, y, z = _coordinates(receptacle.id)
        while True:
            thor_id = (f"{otype}|{x + rng.uniform(-0.3, 0.3):+06.2f}|{y + rng.uniform(0.0, 0.4):+06.2f}"
                       f"|{z + rng.uniform(-0.3, 0.3):+06.2f}")
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
        start = _location(x, z, rng.randrange(4) * 90, 30)
        if start not in taken:
            break
    else:
        raise GenerationError(f"FloorPlan{scene.number}: no free floor point for the agent.")
    return _Draft(scene, start, placements, lamps, params, sentence)


def _problem(draft: _Draft, task_type: str, name: str) -> str:
    """The PDDL problem of a draft, in the layout of ALFWorld's own problems."""
    import alfworld.gen.goal_library as goal_library

    c = _constants()
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
        for ability, predicate in (("Cleanable", "cleanable"), ("Heatable", "heatable"), ("Coolable", "coolable"),
                                   ("Sliceable", "sliceable")):
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
    goal = goal_library.gdict[task_type]["pddl"].format(
        obj=p["object_target"], recep=p["parent_target"], toggle=p["toggle_target"], mrecep=p["mrecep_target"]
    ).replace("#", "-")
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
    scenes = _usable_scenes(task_type, split)
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
            game = GameFile(path=f"<generated {trial}>", problem=problem, task_sentence=draft.task_sentence,
                            task_type=task_type, params=draft.params)
            walkthrough, stats = _verify(game)
        except (GenerationError, ExpertError) as error:
            errors[str(error).split(":")[0]] += 1
            continue
        return GeneratedGame(task_type, split, scene.number, draft.params, draft.task_sentence, problem, walkthrough,
                             trial, seed, index, attempts=attempt + 1, stats=stats)
    raise GenerationError(f"No valid {task_type} game in {MAX_ATTEMPTS} draws ({dict(errors)}).")


def write_game(game: GeneratedGame, out_dir: str) -> str:
    """Write a game in the official layout under ``out_dir/json_2.1.1``; returns its ``game.tw-pddl`` path."""
    directory = os.path.join(out_dir, "json_2.1.1", game.relative_dir())
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "initial_state.pddl"), "w") as f:
        f.write(game.problem)
    with open(os.path.join(directory, TRAJ_FILE), "w") as f:
        json.dump(game.traj_json(), f, indent=1)
    path = os.path.join(directory, GAME_FILE)
    with open(path, "w") as f:
        json.dump(game.game_json(), f)
    return path


def _generate_one(job: tuple[str, str, int, int]) -> GeneratedGame:
    task_type, split, seed, index = job
    return generate_game(task_type, split, seed, index)


def generate_games(
    out_dir: str | None,
    split: str = "train",
    per_type: int = 10,
    task_types: Iterable[str] | None = None,
    seed: int = 0,
    workers: int = 1,
    progress: bool = False,
) -> list[GeneratedGame]:
    """Generate ``per_type`` verified games of each task type (all six by default), and write them under
    ``out_dir/json_2.1.1/<split>/`` when ``out_dir`` is given. ``workers`` > 1 generates in parallel processes
    (same games: each game depends only on (seed, split, type, index))."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
    types = [canonical_task_type(t) for t in task_types] if task_types else list(TASK_TYPES)
    jobs = [(t, split, seed, i) for t in types for i in range(per_type)]
    games: list[GeneratedGame] = []
    start = time.perf_counter()

    def keep(game: GeneratedGame) -> None:  # written as soon as made: a long run interrupted keeps its games
        games.append(game)
        if out_dir is not None:
            write_game(game, out_dir)
        _report(progress, game, len(games), len(jobs), start)

    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for game in pool.imap(_generate_one, jobs):
                keep(game)
    else:
        for job in jobs:
            keep(_generate_one(job))
    return games


def _report(enabled: bool, game: GeneratedGame, done: int, total: int, start: float) -> None:
    if enabled:
        elapsed = time.perf_counter() - start
        print(f"[{done}/{total} {elapsed:.0f}s] {game.relative_dir()} ({len(game.walkthrough)} steps, "
              f"{game.attempts} draw{'s' if game.attempts > 1 else ''})", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trl-epo-alfworld-games",
        description="Generate solvable ALFWorld games offline (official json_2.1.1 layout, verified walkthroughs).",
    )
    parser.add_argument("--out", required=True, help="data root to write into (games go to OUT/json_2.1.1/SPLIT/)")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--per-type", type=int, default=20, help="games per task type (default 20)")
    parser.add_argument("--task-types", nargs="+", default=None,
                        help=f"task types (default: all six: {' '.join(TASK_TYPES)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.per_type < 1:
        parser.error("--per-type must be >= 1")
    start = time.perf_counter()
    games = generate_games(args.out, args.split, args.per_type, args.task_types, args.seed, args.workers,
                           progress=not args.quiet)
    elapsed = time.perf_counter() - start
    counts = Counter(g.task_type for g in games)
    for task_type, count in sorted(counts.items()):
        print(f"{task_type}: {count} games")
    print(f"{len(games)} games in {elapsed:.1f} s ({60 * len(games) / max(elapsed, 1e-9):.0f} games/min) -> "
          f"{os.path.join(args.out, 'json_2.1.1', args.split)}")
    print(f"Use them with: make_dataset('{args.split}', data_root='{args.out}') and AlfWorldEnv(data_root='{args.out}')")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
