"""Multi-turn rollouts on the toy env: exact token sequences, masks and turn ids, truncation, scripted and garbage
policies, fault injection, and EPOTrainer end to end."""

import dataclasses
import glob
import json
import os

import psutil
import pytest
import torch
from conftest import base_config_kwargs
from helpers.policies import garbage_policy, toy_solver
from helpers.pool_envs import FaultyToyEnv
from helpers.scripted import ScriptedLM

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.envs.base import ActionFormat, TaskSpec
from trl_epo.envs.prompting import PromptStyle
from trl_epo.envs.toy import ToyEnv, make_dataset, make_tasks
from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig


toy_oracle = toy_solver  # the scripted solver used across the tests


class RecordingGenerator(ModelGenerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def generate(self, contexts, limits):
        outputs = super().generate(contexts, limits)
        self.calls.append([ids for ids, _ in outputs])
        return outputs


def play(tasks, model, tokenizer, backend="thread", env_factory=ToyEnv, **config):
    config.setdefault("max_episode_tokens", 4000)
    rollout = MultiTurnRollout(env_factory, RolloutConfig(pool_backend=backend, progress_bar=False, **config))
    generator = RecordingGenerator(model, tokenizer)
    try:
        batch = rollout.play(tasks, generator, tokenizer)
        episodes, stats = batch.episodes, batch.stats
    finally:
        rollout.close()
    return episodes, stats, generator


def runs(mask):
    """[(value, start, end)] runs of equal values."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((mask[start], start, i))
            start = i
    return out


def test_sequences_masks_and_turn_ids_are_exact(tokenizer, make_model):
    tasks = make_tasks("train", 3)
    episodes, stats, generator = play(tasks, make_model(), tokenizer, max_turns=3, max_turn_tokens=12)
    style = PromptStyle()
    eos = tokenizer.eos_token_id
    per_turn_outputs = [[] for _ in episodes]
    # Episodes stay live for all 3 turns (the random model never solves a task), so call k holds turn k of each.
    assert len(generator.calls) == 3 and all(len(call) == len(episodes) for call in generator.calls)
    for call in generator.calls:
        for i, ids in enumerate(call):
            per_turn_outputs[i].append(ids)

    for e, task, outputs in zip(episodes, tasks, per_turn_outputs):
        # The prompt is the chat template's rendering of the system instruction and the first observation.
        assert tokenizer.decode(e.prompt_ids) == tokenizer.apply_chat_template(
            e.messages[:2], tokenize=False, add_generation_prompt=True
        )
        # Model tokens are exactly the generated ids, verbatim, one run per turn, in order.
        model_runs = [(s, t) for value, s, t in runs(e.env_mask) if value == 1]
        assert [e.completion_ids[s:t] for s, t in model_runs] == outputs
        assert sum(e.env_mask) == sum(len(o) for o in outputs)
        # Turn ids: 0..T-1 in order; each answer carries its turn index, observation tokens the turn they prompt.
        assert e.turn_ids == sorted(e.turn_ids)
        assert [e.turn_ids[s] for s, _ in model_runs] == list(range(e.turns))
        assert all(len(set(e.turn_ids[s:t])) == 1 for s, t in model_runs)
        # Environment tokens decode to the template around the real env observations (replayed independently).
        env = ToyEnv()
        env.reset(task)
        env_runs = [(s, t) for value, s, t in runs(e.env_mask) if value == 0]
        assert len(env_runs) == e.turns - 1  # no observation after the last answer
        for turn, (s, t) in enumerate(env_runs):
            action = e.actions[turn]
            observation = style.observation_text(env.step(action)) if action is not None else style.invalid_text()
            closed = outputs[turn][-1] == eos
            head = "" if closed else "<|im_end|>"
            expected = f"{head}\n<|im_start|>user\n"
            assert tokenizer.decode(e.completion_ids[s:t]).startswith(expected)
            assert observation in tokenizer.decode(e.completion_ids[s:t])
            assert tokenizer.decode(e.completion_ids[s:t]).endswith("<|im_end|>\n<|im_start|>assistant\n")
        # The whole sequence decodes to prompt + answers + observations, nothing else.
        pieces = [tokenizer.decode(e.prompt_ids)]
        for value, s, t in runs(e.env_mask):
            pieces.append(tokenizer.decode(e.completion_ids[s:t]))
        assert tokenizer.decode(e.prompt_ids + e.completion_ids) == "".join(pieces)
    assert stats.generate_calls == 3  # one batched generate call per turn for all live episodes


def test_truncation_at_max_turns_and_token_budget(tokenizer, make_model):
    tasks = make_tasks("train", 2)
    episodes, stats, _ = play(tasks, make_model(), tokenizer, max_turns=2, max_turn_tokens=8)
    assert all(e.turns == 2 and e.truncated == "max_turns" for e in episodes)
    assert stats.truncation_rate == 1.0

    budget = 70
    episodes, _, _ = play(tasks, make_model(), tokenizer, max_turns=20, max_turn_tokens=8, max_episode_tokens=budget)
    assert all(e.truncated == "token_budget" for e in episodes)
    assert all(len(e.completion_ids) <= budget for e in episodes)
    assert all(e.turns < 20 for e in episodes)


def test_scripted_policy_solves_tasks_through_generate(tokenizer):
    tasks = make_tasks("train", 4)
    model = ScriptedLM(tokenizer, toy_oracle)
    episodes, stats, generator = play(tasks, model, tokenizer, max_turns=12, max_turn_tokens=40)
    assert all(e.won for e in episodes), [(e.actions, e.truncated) for e in episodes]
    assert [e.reward(RolloutConfig()) for e in episodes] == [1.0] * len(episodes)
    assert stats.success_rate == 1.0 and stats.invalid_turn_rate == 0.0
    # Episodes finish at different turns; later turns generate only for the episodes still live.
    assert stats.generate_calls == max(e.turns for e in episodes)
    assert [len(call) for call in generator.calls] == sorted((len(c) for c in generator.calls), reverse=True)


def test_garbage_answers_are_invalid_turns_not_crashes(tokenizer):
    tasks = make_tasks("train", 2)
    model = ScriptedLM(tokenizer, garbage_policy)
    episodes, stats, _ = play(tasks, model, tokenizer, max_turns=3, max_turn_tokens=40, invalid_action_penalty=0.1)
    assert stats.invalid_turn_rate == 1.0
    assert all(e.invalid_turns == 3 and not e.won for e in episodes)
    assert all(e.actions == [None, None, None] for e in episodes)
    config = RolloutConfig(invalid_action_penalty=0.1)
    assert [e.reward(config) for e in episodes] == pytest.approx([-0.3, -0.3])
    assert "Invalid answer" in episodes[0].messages[3]["content"]


@pytest.mark.parametrize("env_error_reward", ["zero", "exclude"])
def test_env_faults_fail_their_episodes_and_later_batches_work(tokenizer, env_error_reward):
    healthy = make_tasks("train", 2)
    faulty = [
        dataclasses.replace(healthy[0], extra={"fault": "raise"}),
        dataclasses.replace(healthy[1], extra={"fault": "hang"}),
        dataclasses.replace(healthy[0], extra={"fault": "exit"}),
        dataclasses.replace(healthy[1], extra={"fault": "raise", "fault_step": 2}),
    ]
    config = RolloutConfig(
        pool_backend="process",
        step_timeout=2.0,
        max_turns=6,
        max_turn_tokens=40,
        max_episode_tokens=4000,
        progress_bar=False,
        env_error_reward=env_error_reward,
    )
    rollout = MultiTurnRollout(FaultyToyEnv, config)
    model = ScriptedLM(tokenizer, toy_oracle)
    try:
        batch = rollout.play(faulty + healthy, ModelGenerator(model, tokenizer), tokenizer)
        episodes, stats = batch.episodes, batch.stats
        errors = [e.env_error for e in episodes]
        assert all(errors[:4]) and not any(errors[4:])
        assert "injected env failure" in errors[0] and "timed out" in errors[1] and "died" in errors[2]
        assert stats.env_error_episodes == 4
        assert all(e.won for e in episodes[4:])  # the healthy episodes of the same batch finish normally
        expected = 0.0 if env_error_reward == "zero" else None
        assert [e.reward(config) for e in episodes[:4]] == [expected] * 4
        assert all(len(e.completion_ids) >= 1 for e in episodes)
        # The next batch on the same pool (fresh workers where they died) plays normally.
        batch = rollout.play(healthy + healthy, ModelGenerator(model, tokenizer), tokenizer)
        episodes, stats = batch.episodes, batch.stats
        assert stats.env_error_episodes == 0 and all(e.won for e in episodes)
        assert rollout.pool.stats["timeouts"] == 1 and rollout.pool.stats["worker_died"] == 1
        worker_pids = [pid for pid in rollout.pool.worker_pids() if pid]
    finally:
        rollout.close()
    assert worker_pids and not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in worker_pids
    )


def test_epo_trainer_trains_two_steps_on_the_toy_env(tokenizer, make_model, tmp_path):
    args = EPOConfig(
        **base_config_kwargs(
            tmp_path,
            max_steps=2,
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=160,
            env_max_turns=3,
            env_max_turn_tokens=12,
            env_pool_backend="thread",
        )
    )
    trainer = EPOTrainer(
        make_model(), args=args, train_dataset=make_dataset("train", 8), processing_class=tokenizer, env_factory=ToyEnv
    )
    seen = []
    original = trainer._compute_loss

    def spy(model, inputs):
        seen.append({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return original(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for log in logs:
        for key in (
            "rollout/success_rate",
            "rollout/mean_turns",
            "rollout/invalid_turn_rate",
            "rollout/time_generate",
            "rollout/time_env",
            "rollout/generated_tokens_per_s",
            "epo/entropy",
            "epo/entropy_turn/0",
            "epo/entropy_turn/1",
            "rewards/env_reward/mean",
        ):
            assert key in log, key
    # turn ids and the env mask reach the loss, aligned with the completion.
    inputs = seen[0]
    assert inputs["turn_ids"].shape == inputs["completion_ids"].shape == inputs["tool_mask"].shape
    model_tokens = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
    assert (inputs["turn_ids"][model_tokens] >= 0).all()
    assert (inputs["turn_ids"][inputs["completion_mask"] == 0] == -1).all()
    assert inputs["turn_ids"].max() >= 1
    # GRPO groups: the num_generations members of a group played the same task with the same seed.
    tasks = [e.task for e in trainer.env_rollout.last_batch.episodes]
    assert all(tasks[i] == tasks[i + 1] for i in range(0, len(tasks), 2))
    # Every episode was written to disk.
    records = [
        json.loads(line) for path in glob.glob(os.path.join(tmp_path, "_rollouts", "*.jsonl")) for line in open(path)
    ]
    assert len(records) == 2 * 4 and all("messages" in r and "reward" in r for r in records)
    assert trainer.env_rollout.pool is None  # the env workers were stopped when training ended


def test_task_rows_round_trip():
    spec = TaskSpec(env="toy", task="open-door", variation=3, seed=7, split="iid", extra={"a": 1})
    assert TaskSpec.from_row(spec.to_row()) == spec
    with pytest.raises(ValueError, match="task"):
        TaskSpec.from_row({"prompt": "x"})


def test_action_parsing():
    fmt = ActionFormat()
    assert fmt.parse("think... <action> go   east </action>") == "go east"
    assert fmt.parse("<action>a</action> then <ACTION>b</ACTION>") == "b"
    assert fmt.parse("<action></action>") is None
    assert fmt.parse("<action>   </action>") is None
    assert fmt.parse("no tags") is None
    assert fmt.parse("<action>" + "x" * 1000 + "</action>") is None
    assert fmt.parse("<action>open door") is None
    assert ActionFormat("answer").parse("<answer>42</answer>") == "42"
    with pytest.raises(ValueError):
        ActionFormat("bad tag")
