"""AlfWorldEnv: real games (official valid_seen / valid_train), datasets, bad actions, turn limit, workers that hang or
die, prefetching, expert SFT data."""

import functools
import os
import shutil
import signal
import time

import pytest
from helpers.alfworld_testdata import small_game_task

from trl_epo.envs import AlfWorldEnv, EnvPool, StepResult, TextEnv
from trl_epo.envs.alfworld import (
    TASK_TYPES,
    expert_episode,
    expert_sft_dataset,
    make_dataset,
    make_tasks,
    normalize_command,
    resolve_data_root,
)


# --------------------------------------------------------------------------------------------------------------------
# Real games
# --------------------------------------------------------------------------------------------------------------------


def test_real_valid_seen_each_task_type_loads_and_the_expert_wins(real_root):
    tasks = make_tasks("iid", real_root)
    assert len(tasks) == 140
    by_type = {}
    for spec in tasks:
        by_type.setdefault(spec.extra["task_type"], []).append(spec)
    assert set(by_type) == set(TASK_TYPES)
    env = AlfWorldEnv(data_root=real_root)
    try:
        for task_type, specs in sorted(by_type.items()):
            spec = specs[len(specs) // 2]
            first = env.reset(spec)
            assert not first.done and not first.won
            assert first.info["task_type"] == task_type
            assert first.info["task_description"] and "Your task is to" not in first.observation
            assert "help" not in first.admissible_actions and any(
                a.startswith("go to ") for a in first.admissible_actions
            )
            steps = expert_episode(env, spec)
            final, _ = steps[-1]
            assert final.won and final.done and final.reward == 1.0, (task_type, spec.task)
            assert all(not r.info.get("invalid_action") for r, _ in steps[1:])
    finally:
        env.close()


def test_real_splits_as_datasets(real_root):
    iid = make_dataset("iid", real_root)
    assert len(iid) == 140 and set(iid["split"]) == {"iid"} and set(iid["task_type"]) == set(TASK_TYPES)
    assert all(not os.path.isabs(p) and p.startswith("valid_seen/") for p in iid["task"])
    assert len(make_dataset("valid_train", real_root)) == 200
    subset = make_dataset("iid", real_root, task_types=["pick_two_obj_and_place"], num_tasks=5, seed=3)
    assert len(subset) == 5 and set(subset["task_type"]) == {"pick_two_obj_and_place"}
    assert (
        subset["task"]
        == make_dataset("iid", real_root, task_types=["pick_two_obj_and_place"], num_tasks=5, seed=3)["task"]
    )
    with pytest.raises(FileNotFoundError, match="valid_unseen"):
        make_tasks("ood", real_root)  # the test data has no valid_unseen split


# --------------------------------------------------------------------------------------------------------------------
# Data roots and datasets
# --------------------------------------------------------------------------------------------------------------------


def test_data_root_resolution_and_errors(generated_root, tmp_path, monkeypatch):
    games_dir = os.path.join(generated_root, "json_2.1.1")
    assert resolve_data_root(generated_root) == games_dir
    assert resolve_data_root(games_dir) == games_dir
    monkeypatch.setenv("ALFWORLD_DATA", generated_root)
    assert resolve_data_root() == games_dir
    with pytest.raises(FileNotFoundError, match="trl-epo-alfworld-games"):
        resolve_data_root(tmp_path)
    with pytest.raises(ValueError, match="Unknown ALFWorld split"):
        make_tasks("test", generated_root)
    with pytest.raises(ValueError, match="Unknown ALFWorld task type"):
        make_tasks("train", generated_root, task_types=["cook"])
    env = AlfWorldEnv(data_root=generated_root)
    with pytest.raises(FileNotFoundError, match="relative to the data root"):
        env.reset({"env": "alfworld", "task": "train/nothing-here/trial/game.tw-pddl"})
    with pytest.raises(RuntimeError, match="reset"):
        env.step("look")


def test_dataset_rows_are_portable(generated_root, tmp_path):
    row = small_game_task(generated_root)
    assert not os.path.isabs(row["task"])
    moved = tmp_path / "elsewhere"
    shutil.copytree(generated_root, moved)
    results = []
    for root in (generated_root, str(moved)):
        env = AlfWorldEnv(data_root=root)
        try:
            first = env.reset(row)
            for action in env.expert_actions():
                last = env.step(action)
            results.append((first.observation, last.won))
        finally:
            env.close()
    assert results[0] == results[1] and results[0][1]


def test_factory_is_picklable_and_env_follows_protocol(generated_root):
    import pickle

    factory = pickle.loads(pickle.dumps(functools.partial(AlfWorldEnv, data_root=generated_root, max_turns=7)))
    env = factory()
    assert isinstance(env, TextEnv) and env.max_turns == 7
    env.close()
    env.close()  # twice is fine


# --------------------------------------------------------------------------------------------------------------------
# Episodes
# --------------------------------------------------------------------------------------------------------------------

BAD_ACTIONS = [
    "",
    "   ",
    "x" * 10_000,
    "go to " + "drawer " * 2000,
    "ドアを開ける 🚪 ouvrir la porte ﷺ \u202e\u0000",
    "<action></action>",
    "<action>go to bed 1</action>",
    "; rm -rf / && echo $(whoami) `id` | cat /etc/passwd > {marker}",  # {marker}: a file in the test's tmp_path
    "__import__('os').system('echo pwned')",
    "{r.name} #intro# [x]",
]


def test_bad_actions_get_feedback_and_are_flagged(generated_root, tmp_path):
    marker = tmp_path / "pwned"
    env = AlfWorldEnv(data_root=generated_root)
    try:
        row = small_game_task(generated_root)
        first = env.reset(row)
        for action in BAD_ACTIONS:
            result = env.step(action.replace("{marker}", str(marker)))
            assert isinstance(result, StepResult)
            assert result.observation == "Nothing happens."
            assert result.info["invalid_action"] is True
            assert not result.done and not result.won and result.reward == 0.0
            assert result.admissible_actions == first.admissible_actions  # the game state did not change
        # The episode goes on: the expert still wins from here.
        for action in env.expert_actions():
            last = env.step(action)
            assert last.info["invalid_action"] is False
        assert last.won and last.done and last.reward == 1.0
        assert env.turns == len(BAD_ACTIONS) + len(env.expert_actions())
    finally:
        env.close()
    assert not marker.exists()


def test_actions_are_matched_case_and_space_insensitively(generated_root):
    assert normalize_command("  Go TO   Bed 1. ") == "go to bed 1"
    env = AlfWorldEnv(data_root=generated_root)
    strict = AlfWorldEnv(data_root=generated_root, normalize_actions=False)
    try:
        row = small_game_task(generated_root)
        first_action = None
        for e in (env, strict):
            e.reset(row)
            first_action = e.expert_actions()[0]
        shouted = "  " + first_action.upper() + ". "
        assert env.step(shouted).info["invalid_action"] is False
        assert strict.step(shouted).info["invalid_action"] is True
    finally:
        env.close()
        strict.close()


def test_turn_limit_ends_the_episode(generated_root):
    env = AlfWorldEnv(data_root=generated_root, max_turns=3)
    try:
        env.reset(small_game_task(generated_root))
        results = [env.step("look") for _ in range(3)]
        assert [r.done for r in results] == [False, False, True]
        assert not results[-1].won and results[-1].reward == 0.0
        over = env.step("look")
        assert over.done and over.observation == "The episode is over."
        # A new reset starts a fresh episode.
        again = env.reset(small_game_task(generated_root))
        assert not again.done and env.turns == 0
    finally:
        env.close()


# --------------------------------------------------------------------------------------------------------------------
# Workers that hang or die (EnvPool, process backend)
# --------------------------------------------------------------------------------------------------------------------


def test_pool_worker_killed_or_hung_fails_the_episode_and_the_run_goes_on(generated_root):
    row = small_game_task(generated_root)
    factory = functools.partial(AlfWorldEnv, data_root=generated_root)
    with EnvPool(factory, size=2, backend="process", step_timeout=5.0, reset_timeout=120.0) as pool:
        first = pool.reset([(0, row), (1, row)])
        assert all(r.env_error is None and not r.done for r in first)
        plan = AlfWorldEnv(data_root=generated_root)
        plan.reset(row)
        actions = plan.expert_actions()
        plan.close()

        # Worker 0 dies mid-episode: its episode fails, slot 1 plays on.
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        time.sleep(0.2)
        results = pool.step([(0, actions[0]), (1, actions[0])])
        assert results[0].done and not results[0].won and results[0].env_error
        assert results[1].env_error is None and not results[1].info["invalid_action"]

        # Worker 1 hangs (stopped): its step times out, it is killed, slot 0 gets a fresh worker and wins.
        pool.reset([(0, row)])
        os.kill(pool.worker_pids()[1], signal.SIGSTOP)
        results = pool.step([(0, actions[0]), (1, actions[1] if len(actions) > 1 else actions[0])])
        assert results[1].done and "timed out" in results[1].env_error
        assert results[0].env_error is None
        for action in actions[1:]:
            (last,) = pool.step([(0, action)])
        assert last.won and last.done
        assert pool.stats["timeouts"] == 1 and pool.stats["worker_died"] >= 1

        # Both slots reset and play again.
        again = pool.reset([(0, row), (1, row)])
        assert all(r.env_error is None for r in again)


# --------------------------------------------------------------------------------------------------------------------
# Ahead of need
# --------------------------------------------------------------------------------------------------------------------


def test_prefetch_translates_the_next_games_in_the_background(generated_root):
    tasks = make_tasks("train", generated_root, task_types=["look_at_obj_in_light", "pick_and_place_simple"])[:3]
    env = AlfWorldEnv(data_root=generated_root)
    try:
        env.prefetch(tasks)
        deadline = time.time() + 120
        while not all(env.game_path(t) in env.cache for t in tasks):
            assert time.time() < deadline, "prefetch did not finish"
            time.sleep(0.05)
        assert env.cache.prefetched == len(tasks) and env.cache.misses == 0
        for t in tasks:
            assert not env.reset(t).done
        assert env.cache.hits == len(tasks) and env.cache.misses == 0  # no translation at reset
        # A reset right after a prefetch of the same game waits for it instead of translating twice.
        fresh = AlfWorldEnv(data_root=generated_root)
        fresh.prefetch(tasks[:1])
        fresh.reset(tasks[0])
        assert fresh.cache.misses + fresh.cache.prefetched == 1
        fresh.close()
    finally:
        env.close()


# --------------------------------------------------------------------------------------------------------------------
# Expert demonstrations
# --------------------------------------------------------------------------------------------------------------------


def test_expert_sft_dataset_is_chat_formatted(generated_root):
    from trl_epo.envs.base import ActionFormat

    tasks = make_tasks("train", generated_root, task_types=["look_at_obj_in_light", "pick_and_place_simple"])
    dataset = expert_sft_dataset(tasks, data_root=generated_root)
    env = AlfWorldEnv(data_root=generated_root)
    lengths = []
    for t in tasks:
        env.reset(t)
        lengths.append(len(env.expert_actions()))
    env.close()
    assert len(dataset) == sum(lengths)
    fmt = ActionFormat()
    for row in dataset:
        prompt, (answer,) = row["prompt"], row["completion"]
        assert prompt[0]["role"] == "system" and prompt[1]["role"] == "user"
        assert prompt[1]["content"].startswith("Task: ")
        assert [m["role"] for m in prompt[1:]] == ["user", "assistant"] * row["turn"] + ["user"]
        assert answer["role"] == "assistant"
        action = fmt.parse(answer["content"])
        assert action and answer["content"] == f"<action>{action}</action>"
        assert action in prompt[-1]["content"].split("Available actions: ", 1)[1]
    windowed = expert_sft_dataset(tasks[:1], data_root=generated_root, history=1)
    assert len(windowed) == lengths[0]
    for row in windowed:  # the rollout's windowed prompt: system + one user message with the last pair
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        content = row["prompt"][1]["content"]
        assert content.startswith("Task: ") and ("Your last 1 step(s):" in content) == (row["turn"] > 0)
