"""ALFWorld in the multi-turn rollout and EPOTrainer: a scripted agent wins through the real rollout; two EPO
optimizer steps with a tiny model via examples/train_alfworld.py."""

import functools
import glob
import importlib.util
import json
import os
import sys

from helpers.alfworld_testdata import REPO_ROOT
from helpers.scripted import ScriptedLM

from trl_epo.envs.alfworld import AlfWorldEnv, make_tasks
from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def train_alfworld_tiny(generated_root, output_dir, *flags):
    """examples/train_alfworld.py with its tiny config on the generated games, env workers on threads; the trainer."""
    return _load_example("train_alfworld").main(
        [
            "--config", str(REPO_ROOT / "examples" / "configs" / "alfworld_tiny.yaml"),
            "--data_root", generated_root,
            "--generate_per_type", "0",
            "--output_dir", str(output_dir),
            "--env_pool_backend", "thread",
            *flags,
        ]
    )  # fmt: skip


def test_scripted_agent_wins_alfworld_through_the_rollout(tokenizer, generated_root):
    tasks = [
        make_tasks("train", generated_root, task_types=[t])[0]
        for t in ("look_at_obj_in_light", "pick_and_place_simple")
    ]
    env = AlfWorldEnv(data_root=generated_root)
    walkthroughs = {}
    for spec in tasks:
        description = env.reset(spec).info["task_description"]
        walkthroughs[description] = env.expert_actions()
    env.close()
    assert len(walkthroughs) == len(tasks)  # the task sentences tell the games apart

    def oracle(conversation: str) -> str:
        description = conversation.split("Task: ", 1)[1].split("\n", 1)[0].strip()
        turn = conversation.count("<|im_start|>assistant") - 1  # the generation prompt opens one more
        return f"I follow the plan. <action>{walkthroughs[description][turn]}</action>"

    # The thread backend: envs in threads of one process must not trip over each other (TextWorld's parsers are
    # module-level; the engine serialises them).
    rollout = MultiTurnRollout(
        functools.partial(AlfWorldEnv, data_root=generated_root),
        RolloutConfig(
            max_turns=12, max_turn_tokens=48, max_episode_tokens=20000, pool_backend="thread", progress_bar=False
        ),
    )
    try:
        batch = rollout.play(tasks, ModelGenerator(ScriptedLM(tokenizer, oracle), tokenizer), tokenizer)
        episodes, stats = batch.episodes, batch.stats
    finally:
        rollout.close()
    assert stats.success_rate == 1.0 and stats.invalid_turn_rate == 0.0 and stats.env_error_episodes == 0
    for episode, spec in zip(episodes, tasks):
        assert episode.won and episode.env_error is None
        assert episode.turns == len(walkthroughs[episode.description])


def test_epo_trains_two_steps_on_alfworld_games(generated_root, tmp_path):
    out = tmp_path / "run"
    trainer = train_alfworld_tiny(generated_root, out)
    assert trainer.state.global_step == 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for log in logs:
        for key in (
            "epo/entropy",
            "epo/beta",
            "rollout/success_rate",
            "rollout/mean_turns",
            "rewards/env_reward/mean",
        ):
            assert key in log, key
    assert logs[1]["epo/beta"] < logs[0]["epo/beta"] and "epo/reference" in logs[1]
    records = [
        json.loads(line) for path in glob.glob(os.path.join(out, "_rollouts", "*.jsonl")) for line in open(path)
    ]
    assert len(records) == 2 * 4
    first_user = next(m["content"] for m in records[0]["messages"] if m["role"] == "user")
    assert first_user.startswith("Task: ") and "Available actions: " in first_user and "go to " in first_user
    assert os.path.isfile(out / "config.json") and os.path.isfile(out / "tokenizer.json")
