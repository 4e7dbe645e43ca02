"""The offline game generator: every walkthrough wins through the real engine, no game is won at reset, the official
layout, determinism, and the split's scenes."""

import json
import os

import pytest
from helpers.alfworld_testdata import GENERATED_PER_TYPE, GENERATED_SEED

from trl_epo.envs.alfworld import TASK_TYPES, AlfWorldEnv, games, make_dataset, make_tasks, read_game
from trl_epo.envs.alfworld.game_writer import main
from trl_epo.envs.alfworld.games import GenerationError, generate_game
from trl_epo.envs.alfworld.scenes import UNSEEN_SCENES, load_scene, scene_numbers, usable_scenes


def test_generated_walkthroughs_win_through_the_engine_and_no_game_is_won_at_reset(generated_root, generated):
    tasks = make_tasks("train", generated_root)
    assert len(tasks) == GENERATED_PER_TYPE * len(TASK_TYPES)
    counts = {}
    for spec in tasks:
        counts[spec.extra["task_type"]] = counts.get(spec.extra["task_type"], 0) + 1
    assert counts == {t: GENERATED_PER_TYPE for t in TASK_TYPES}
    env = AlfWorldEnv(data_root=generated_root)
    try:
        for spec in tasks:
            first = env.reset(spec)
            assert not first.won and not first.done, f"{spec.task} is won at reset"
            walkthrough = read_game(env.game_path(spec)).walkthrough
            assert walkthrough and list(walkthrough) == env.expert_actions()
            for i, action in enumerate(walkthrough):
                assert action in env.admissible_actions(), (spec.task, i, action)
                result = env.step(action)
                assert not result.info["invalid_action"]
                assert result.won == (i == len(walkthrough) - 1), (spec.task, i)  # wins exactly at the end
            assert result.done and result.reward == 1.0
    finally:
        env.close()


def test_official_layout(generated_root, generated):
    game = generated[0]
    directory = os.path.join(generated_root, "json_2.1.1", "train", game.task_dir, game.trial)
    assert sorted(os.listdir(directory)) == ["game.tw-pddl", "initial_state.pddl", "traj_data.json"]
    with open(os.path.join(directory, "game.tw-pddl")) as f:
        data = json.load(f)
    assert data["solvable"] is True and "pddl_domain" in data and "Your task is to: " in data["grammar"]
    with open(os.path.join(directory, "traj_data.json")) as f:
        traj = json.load(f)
    assert traj["task_type"] == game.task_type
    assert traj["pddl_params"]["object_target"] == game.params["object_target"]
    assert traj["scene"]["floor_plan"] == f"FloorPlan{game.scene}"
    assert game.task_dir.startswith(f"{game.task_type}-{game.params['object_target']}-None-")
    assert game.task_dir.endswith(f"-{game.scene}")
    dataset = make_dataset("train", generated_root)
    assert set(dataset["task_type"]) == set(TASK_TYPES)


def test_generator_is_deterministic_for_a_seed(generated):
    look_at = next(g for g in generated if g.task_type == "look_at_obj_in_light" and g.index == 0)
    again = generate_game("look_at_obj_in_light", "train", seed=GENERATED_SEED, index=0)
    assert (again.problem, again.walkthrough, again.task_sentence, again.trial) == (
        look_at.problem,
        look_at.walkthrough,
        look_at.task_sentence,
        look_at.trial,
    )
    assert again.game_json() == look_at.game_json() and again.traj_json() == look_at.traj_json()
    other = generate_game("look_at_obj_in_light", "train", seed=GENERATED_SEED + 1, index=0)
    assert other.problem != look_at.problem
    # The scene draft (objects, places, goal) of every task type is a function of (seed, split, type, index).
    for task_type in TASK_TYPES:
        drafts = []
        for _ in range(2):
            rng = games._rng(7, "train", task_type, 3, 0)
            scene = rng.choice(usable_scenes(task_type, "train"))
            draft = games._draft(scene, task_type, rng)
            drafts.append(games._problem(draft, task_type, "trial"))
        assert drafts[0] == drafts[1]


def test_unseen_scenes_stay_out_of_training_games(generated):
    train_scenes = set(scene_numbers("train"))
    assert not train_scenes & set(UNSEEN_SCENES) and train_scenes == set(scene_numbers("valid_seen"))
    assert set(scene_numbers("valid_unseen")) == set(UNSEEN_SCENES)
    assert all(g.scene not in UNSEEN_SCENES for g in generated)
    for task_type in TASK_TYPES:
        assert all(s.number not in UNSEEN_SCENES for s in usable_scenes(task_type, "train"))
    unseen = generate_game("pick_and_place_simple", "valid_unseen", seed=0, index=0)
    assert unseen.scene in UNSEEN_SCENES and unseen.split == "valid_unseen"
    with pytest.raises(ValueError, match="Unknown split"):
        scene_numbers("test")


def test_look_at_tasks_use_desk_lamps_on_furniture(generated):
    for game in (g for g in generated if g.task_type == "look_at_obj_in_light"):
        assert game.params["toggle_target"] == "DeskLamp"
        assert game.walkthrough[-1].startswith("use desklamp")
        assert "FloorLamp" not in game.problem.split("(:goal", 1)[1]
    scene = load_scene(330)  # a bedroom with only a floor lamp offers no look-at task
    assert not scene.has_desk_lamp
    assert all(s.has_desk_lamp for s in usable_scenes("look_at_obj_in_light", "train"))


def test_generation_errors_are_clear():
    with pytest.raises(ValueError, match="Unknown ALFWorld task type"):
        generate_game("pick_three_obj_and_place")
    # Heating needs a microwave: no living room or bedroom scene can host it.
    assert all(s.room_type == "Kitchen" for s in usable_scenes("pick_heat_then_place", "train"))
    with pytest.raises(GenerationError, match="offers no"):
        games._draft(load_scene(330), "pick_heat_then_place_in_recep", games._rng(0, "", "", 0, 0))


def test_command_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--per-type", "1", "--task-types", "look_at_obj_in_light", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "look_at_obj_in_light: 1 games" in out and "games/min" in out
    (spec,) = make_tasks("train", tmp_path)
    env = AlfWorldEnv(data_root=str(tmp_path))
    try:
        env.reset(spec)
        for action in env.expert_actions():
            result = env.step(action)
        assert result.won
    finally:
        env.close()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--per-type", "0"])
