"""The ALFWorld engine: the same game text and commands as stock TextWorld (PddlEnv + alfworld's demangler, with the
installed domain and grammar), old game files played with the installed grammar, and the expert."""

import glob
import json
import os
import random

import pytest

from trl_epo.envs.alfworld.engine import new_engine, stock_engine_play
from trl_epo.envs.alfworld.pddl import CompiledGameCache, read_game, task_sentence_from_grammar
from trl_epo.envs.alfworld.planner import ExpertError, SceneFacts, expert_plan


def _random_walk(path, steps, seed):
    """Play random admissible commands (and a few unknown ones) in our engine: the commands and what it showed."""
    engine = new_engine()
    try:
        engine.load_compiled(CompiledGameCache().get(path))
        state = engine.reset()
        shown = [(state.feedback, list(state.admissible_commands), bool(state["won"]))]
        rng = random.Random(seed)
        commands = []
        for i in range(steps):
            command = "put pencil 1 in/on dresser 1" if i % 7 == 3 else rng.choice(state.admissible_commands)
            commands.append(command)
            state, _, _ = engine.step(command)
            shown.append((state.feedback, list(state.admissible_commands), bool(state["won"])))
        return commands, shown
    finally:
        engine.close()


def _bedroom_game(root, split, task_type="*"):
    games = sorted(glob.glob(os.path.join(root, "json_2.1.1", split, f"{task_type}-*", "*", "game.tw-pddl")))
    for path in games:  # a bedroom or living-room game loads fast in stock TextWorld
        if path.split(os.sep)[-3].rsplit("-", 1)[-1].startswith(("2", "3")):
            return path
    return games[0]


def test_engine_matches_stock_textworld_on_real_game(real_root):
    path = _bedroom_game(real_root, "valid_seen")
    commands, ours = _random_walk(path, steps=12, seed=1)
    assert ours == stock_engine_play(path, commands)


def test_engine_matches_stock_textworld_on_generated_game(generated_root):
    path = _bedroom_game(generated_root, "train")
    commands, ours = _random_walk(path, steps=12, seed=2)
    assert ours == stock_engine_play(path, commands)


def test_old_game_files_are_played_with_the_installed_grammar(real_root):
    path = _bedroom_game(real_root, "valid_seen", "pick_and_place_simple")
    with open(path) as f:
        embedded = json.load(f)["grammar"]
    assert 'template :: "put {o} in/on {r}"' in embedded  # the file carries the older command wording
    game = read_game(path)
    assert game.task_sentence == task_sentence_from_grammar(embedded)
    assert game.task_sentence.endswith(".") and "UNKNOWN GOAL" not in game.task_sentence
    engine = new_engine()
    try:
        engine.load_compiled(CompiledGameCache().get(path))
        state = engine.reset()
        assert state.feedback.rstrip().endswith(f"Your task is to: {game.task_sentence}")
        names = {k: info.name for k, info in engine._entity_infos.items()}
        expert = expert_plan(SceneFacts.from_facts(engine.facts(), names), game.task_type, game.params)
        for command in expert:
            assert command in state["_valid_commands"], command
            state, _, _ = engine.step(command)
        assert state["won"]
    finally:
        engine.close()
    assert any(c.startswith("move ") for c in expert)  # installed wording: "move X to Y", not "put X in/on Y"
    assert not any(" in/on " in c for c in expert)


def test_expert_plans_from_facts_and_reports_missing_things():
    scene = SceneFacts(
        agent_location="l0",
        names={"r1": "desk 1", "r2": "drawer 1", "o1": "pen 1"},
        receptacle_location={"r1": "l1", "r2": "l1"},
        container={"o1": "r2"},
        object_type={"o1": "pen"},
        receptacle_type={"r1": "desk", "r2": "drawer"},
        openable={"r2"},
        properties={"pickupable": {"o1"}, "coolable": {"o1"}},
    )
    # The drawer and the desk share a location: one "go to", no second one (it would not be admissible).
    assert expert_plan(scene, "pick_and_place", {"object_target": "Pen", "parent_target": "Desk"}) == [
        "go to drawer 1",
        "open drawer 1",
        "take pen 1 from drawer 1",
        "move pen 1 to desk 1",
    ]
    with pytest.raises(ExpertError, match="No book"):
        expert_plan(scene, "pick_and_place", {"object_target": "Book", "parent_target": "Desk"})
    with pytest.raises(ExpertError, match="No fridge"):
        expert_plan(scene, "pick_cool_then_place", {"object_target": "Pen", "parent_target": "Desk"})
    with pytest.raises(ExpertError, match="No pen"):  # not cleanable
        expert_plan(scene, "pick_clean_then_place", {"object_target": "Pen", "parent_target": "Desk"})
    with pytest.raises(ExpertError, match="floor lamp"):
        expert_plan(scene, "look_at_obj_in_light", {"object_target": "Pen", "toggle_target": "FloorLamp"})
    with pytest.raises(ExpertError, match="Fewer than two"):
        expert_plan(scene, "pick_two_obj_and_place", {"object_target": "Pen", "parent_target": "Desk"})
    with pytest.raises(ValueError, match="Unknown ALFWorld task type"):
        expert_plan(scene, "juggle", {"object_target": "Pen"})
