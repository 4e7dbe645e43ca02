"""The AI2-THOR floor plans ALFWorld games are set in, read from what the ``alfworld`` wheel ships: the layouts
(``alfworld/gen/layouts``: the receptacles of each of the 120 scenes with their viewing poses, the object types
present, the reachable floor points) and the object/receptacle affordances (``alfworld.gen.constants``); and what a
scene offers to each task type (`usable_scenes`, `task_choices`).

The valid_unseen scenes (10, 219, 308, 424) are never used for train or valid_seen games; valid_unseen games use only
them.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from functools import cache

from .pddl import canonical_task_type


UNSEEN_SCENES = (10, 219, 308, 424)  # ALFWorld's valid_unseen floor plans: never in generated train/valid_seen games
SPLITS = ("train", "valid_seen", "valid_unseen")  # the splits games are generated for
# Receptacle types a desk lamp can stand on (it must be *in* a receptacle for "use" to be admissible).
LAMP_HOSTS = ("Desk", "SideTable", "Dresser", "Shelf", "CoffeeTable", "DiningTable", "TVStand")
# The appliance a task type needs (and which therefore is not its target receptacle).
APPLIANCES = {
    "pick_clean_then_place_in_recep": ("Cleanable", "SinkBasin"),
    "pick_heat_then_place_in_recep": ("Heatable", "Microwave"),
    "pick_cool_then_place_in_recep": ("Coolable", "Fridge"),
}


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


def alfworld_constants():
    """``alfworld.gen.constants`` (object/receptacle affordances, scene types), imported on first use."""
    from alfworld.gen import constants

    return constants


def _layouts_dir() -> str:
    import alfworld.gen

    return os.path.join(os.path.dirname(alfworld.gen.__file__), "layouts")


def static_receptacle_types() -> set[str]:
    c = alfworld_constants()
    return set(c.RECEPTACLES) - set(c.MOVABLE_RECEPTACLES)


def placeable_object_types() -> set[str]:
    """Object types that some static receptacle can hold (pickupable things), sliced variants excluded."""
    c = alfworld_constants()
    static = static_receptacle_types()
    types = set()
    for rtype, objects in c.VAL_RECEPTACLE_OBJECTS.items():
        if rtype in static:
            types |= {o for o in objects if not o.endswith("Sliced")}
    return types


def location_name(x: float, z: float, rotation: float, horizon: float) -> str:
    """A viewing pose as ALFWorld names locations: ``loc|<x / 0.25>|<z / 0.25>|<rotation / 90>|<horizon>``."""
    return f"loc|{round(x / 0.25)}|{round(z / 0.25)}|{int(rotation) // 90 % 4}|{int(horizon)}"


def coordinates(thor_id: str) -> tuple[float, float, float]:
    """The (x, y, z) position in an AI2-THOR id (``Drawer|+01.58|+00.17|+02.14``); zeros when it has none."""
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
    return sorted(n for n in alfworld_constants().TRAIN_SCENE_NUMBERS if n not in UNSEEN_SCENES)


@cache
def load_scene(number: int) -> Scene:
    """A floor plan from the layouts shipped in the alfworld wheel."""
    import numpy as np

    c = alfworld_constants()
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
            receptacles.append(Receptacle(thor_id, rtype, location_name(x, z, rotation, horizon)))
    floor_points = tuple((float(x), float(z)) for x, z in points.tolist())
    # Receptacles the scene has but whose viewing pose is not in the layout file: placed at a floor point, drawn by a
    # generator seeded with the scene number (so a scene is the same in every game).
    rng = random.Random(f"scene/{number}")
    have = {r.type for r in receptacles}
    for rtype in sorted(set(present) & static - have):
        for _ in range(rng.randint(2, 4) if rtype == "StoveBurner" else 1):
            x, z = rng.choice(floor_points)
            thor_id = f"{rtype}|{x:+06.2f}|{rng.uniform(0, 1.5):+06.2f}|{z:+06.2f}"
            receptacles.append(Receptacle(thor_id, rtype, location_name(x, z, rng.randrange(4) * 90, 30)))
    placeable = placeable_object_types()
    objects = tuple(sorted(t for t in set(present) if t in placeable))
    return Scene(number, room_type, tuple(receptacles), objects, "DeskLamp" in present, floor_points)


def usable_scenes(task_type: str, split: str) -> list[Scene]:
    """The scenes of a split where a game of this task type can be set (right room type, appliance or lamp)."""
    c = alfworld_constants()
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


def task_choices(scene: Scene, task_type: str) -> list[tuple[str, str]]:
    """(object type, parent type) pairs this scene offers for the task type (parent = toggle for look-at)."""
    c = alfworld_constants()
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
