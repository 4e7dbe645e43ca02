"""The expert planner for ALFWorld games: reads the initial PDDL facts of a game and writes the commands that solve
it (go to the object's receptacle, open it if needed, take the object, heat / cool / clean it, go to the target
receptacle, open it, put the object down; for look-at tasks: take the object and switch on the lamp next to it).

No search (fast-downward's own planner can take more than a minute on pick-two games): the plan follows the task's
fixed recipe, so it is linear in the size of the scene. It is an *oracle* (it knows where everything is),
used to write walkthroughs of generated games, to check that games are solvable by replaying the plan through the
real engine, and to build supervised (SFT) data. Pure functions of the facts; no engine needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .pddl import canonical_task_type


class ExpertError(ValueError):
    """The expert found no plan for this game (e.g. the target object is nowhere it can be taken from)."""


@dataclass
class SceneFacts:
    """The facts the expert needs, by entity id (lower-case PDDL names as the engine reports them)."""

    agent_location: str
    names: dict[str, str]
    receptacle_location: dict[str, str] = field(default_factory=dict)
    container: dict[str, str] = field(default_factory=dict)  # object -> the receptacle it is in
    object_type: dict[str, str] = field(default_factory=dict)  # object -> type, e.g. "pencil"
    receptacle_type: dict[str, str] = field(default_factory=dict)  # receptacle -> type, e.g. "dresser"
    openable: set[str] = field(default_factory=set)
    opened: set[str] = field(default_factory=set)
    properties: dict[str, set[str]] = field(default_factory=dict)  # "pickupable", "cleanable", ... -> objects

    @classmethod
    def from_facts(cls, facts: Iterable[Any], names: Mapping[str, str]) -> SceneFacts:
        """From the engine's facts (TextWorld `Proposition`s) and the display name of every entity id."""
        scene = cls(agent_location="", names=dict(names))
        for fact in facts:
            name = fact.name.lower()
            args = [v.name for v in fact.arguments]
            if name == "atlocation":
                scene.agent_location = args[1]
            elif name == "receptacleatlocation":
                scene.receptacle_location[args[0]] = args[1]
            elif name == "inreceptacle":
                scene.container[args[0]] = args[1]
            elif name == "objecttype":
                scene.object_type[args[0]] = _type_name(args[1])
            elif name == "receptacletype":
                scene.receptacle_type[args[0]] = _type_name(args[1])
            elif name == "openable":
                scene.openable.add(args[0])
            elif name == "opened":
                scene.opened.add(args[0])
            elif len(args) == 1:
                scene.properties.setdefault(name, set()).add(args[0])
        if not scene.agent_location:
            raise ExpertError("The facts place the agent nowhere (no atLocation fact).")
        return scene

    def has(self, prop: str, entity: str) -> bool:
        return entity in self.properties.get(prop, ())


def _type_name(value: str) -> str:
    value = value.lower()
    return value.removesuffix("type")


class _Plan:
    """The plan being written, with the bits of state it changes (where the agent is, what is open, where objects
    are)."""

    def __init__(self, scene: SceneFacts):
        self.scene = scene
        self.at = scene.agent_location
        self.opened = set(scene.opened)
        self.container = dict(scene.container)
        self.commands: list[str] = []

    def name(self, entity: str) -> str:
        return self.scene.names[entity]

    def go_to(self, receptacle: str) -> None:
        location = self.scene.receptacle_location[receptacle]
        if location != self.at:  # "go to X" is not admissible where X already is
            self.commands.append(f"go to {self.name(receptacle)}")
            self.at = location

    def open_if_closed(self, receptacle: str) -> None:
        if receptacle in self.scene.openable and receptacle not in self.opened:
            self.commands.append(f"open {self.name(receptacle)}")
            self.opened.add(receptacle)

    def take(self, obj: str) -> None:
        receptacle = self.container.pop(obj)
        self.go_to(receptacle)
        self.open_if_closed(receptacle)
        self.commands.append(f"take {self.name(obj)} from {self.name(receptacle)}")

    def put(self, obj: str, receptacle: str) -> None:
        self.go_to(receptacle)
        self.open_if_closed(receptacle)
        self.commands.append(f"move {self.name(obj)} to {self.name(receptacle)}")
        self.container[obj] = receptacle

    def use_appliance(self, verb: str, obj: str, appliance: str) -> None:
        self.go_to(appliance)
        self.commands.append(f"{verb} {self.name(obj)} with {self.name(appliance)}")

    def cost_to_take(self, obj: str) -> int:
        receptacle = self.container[obj]
        cost = int(self.scene.receptacle_location[receptacle] != self.at)
        return cost + int(receptacle in self.scene.openable and receptacle not in self.opened)


def _receptacles_of_type(scene: SceneFacts, rtype: str) -> list[str]:
    found = [r for r, t in scene.receptacle_type.items() if t == rtype and r in scene.receptacle_location]
    # Prefer receptacles that need no opening; then by display name, for a deterministic plan.
    return sorted(found, key=lambda r: (r in scene.openable and r not in scene.opened, scene.names.get(r, r)))


_NEEDS = {
    "pick_clean_then_place_in_recep": ("cleanable", "clean", "sinkbasin"),
    "pick_heat_then_place_in_recep": ("heatable", "heat", "microwave"),
    "pick_cool_then_place_in_recep": ("coolable", "cool", "fridge"),
}


def expert_plan(scene: SceneFacts, task_type: str, params: Mapping[str, Any]) -> list[str]:
    """The commands that solve the task from the scene's initial state.

    Args:
        scene: the initial facts (`SceneFacts.from_facts`).
        task_type: an ALFWorld task type (official or short name).
        params: ``object_target``, ``parent_target`` and, for look-at tasks, ``toggle_target`` (as in
            ``traj_data.json``'s ``pddl_params``; case-insensitive type names such as ``"Pencil"``).

    Raises:
        ExpertError: when the scene has no object, receptacle, appliance or lamp the recipe needs.
    """
    task_type = canonical_task_type(task_type)
    target = str(params.get("object_target") or "").lower()
    if not target:
        raise ExpertError("The task parameters name no object_target.")
    plan = _Plan(scene)
    needed = _NEEDS.get(task_type)
    candidates = [
        o
        for o, t in scene.object_type.items()
        if t == target
        and o in plan.container
        and scene.has("pickupable", o)
        and (needed is None or scene.has(needed[0], o))
    ]
    if not candidates:
        raise ExpertError(f"No {target} in this scene can be taken from a receptacle.")

    def nearest(objects: list[str]) -> str:
        return min(objects, key=lambda o: (plan.cost_to_take(o), scene.names.get(o, o)))

    if task_type == "look_at_obj_in_light":
        toggle = str(params.get("toggle_target") or "").lower()
        lamps = sorted(
            (
                o
                for o, t in scene.object_type.items()
                if t == toggle and o in scene.container and scene.has("toggleable", o)
            ),
            key=lambda o: scene.names.get(o, o),
        )
        if not lamps:
            raise ExpertError(f"No {toggle or 'lamp'} standing in a receptacle (a floor lamp cannot be used).")
        obj = nearest(candidates)
        plan.take(obj)
        lamp = lamps[0]
        plan.go_to(scene.container[lamp])
        plan.commands.append(f"use {plan.name(lamp)}")
        return plan.commands

    parent = str(params.get("parent_target") or "").lower()
    targets = _receptacles_of_type(scene, parent)
    if not targets:
        raise ExpertError(f"No {parent or 'target receptacle'} in this scene.")

    if task_type == "pick_two_obj_and_place":
        # Objects already in a target receptacle count (then that receptacle is the one to fill).
        placed = {r: [o for o in candidates if plan.container[o] == r] for r in targets}
        destination = max(targets, key=lambda r: len(placed[r]))
        missing = 2 - min(2, len(placed[destination]))
        movable = [o for o in candidates if plan.container[o] != destination]
        if len(movable) < missing:
            raise ExpertError(f"Fewer than two {target} can be brought to a {parent}.")
        for _ in range(missing):
            obj = nearest(movable)
            movable.remove(obj)
            plan.take(obj)
            plan.put(obj, destination)
        return plan.commands

    # Single object: prefer one not already in a target receptacle (moving an object within one is pointless).
    outside = [o for o in candidates if plan.container[o] not in targets] or candidates
    obj = nearest(outside)
    plan.take(obj)
    if needed is not None:
        _, verb, appliance_type = needed
        appliances = _receptacles_of_type(scene, appliance_type)
        if not appliances:
            raise ExpertError(f"No {appliance_type} in this scene to {verb} the {target} with.")
        plan.use_appliance(verb, obj, appliances[0])
    plan.put(obj, targets[0])
    return plan.commands
