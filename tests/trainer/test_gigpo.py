"""GiGPO (trl_epo.gigpo): hand-computed advantages on built episodes, and on real toy-env rollouts the same per-turn
advantages on the action tokens of every row layout, reaching TRL's loss as per-token advantages."""

import math

import pytest
import torch
from conftest import windowed_config_kwargs

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.envs.toy import ToyEnv, make_dataset
from trl_epo.gigpo import (
    anchor_groups,
    gigpo_advantages,
    set_turn_advantages,
    step_advantages,
    step_returns,
    turn_rewards,
)
from trl_epo.row_training import RowTrainingMixin
from trl_epo.rows import episode_rows, group_advantages


NAN = float("nan")


def test_step_returns_and_turn_rewards():
    assert step_returns([0.0, 0.0, 1.0], 0.95) == pytest.approx([0.9025, 0.95, 1.0])
    assert step_returns([0.0, 0.0, 1.0], 1.0) == [1.0, 1.0, 1.0]
    # the penalties stay on their turns, the outcome on the last: they add up to the episode's reward
    assert turn_rewards(0.8, [False, True, True, False], 0.1) == pytest.approx([0.0, -0.1, -0.1, 1.0])
    assert sum(turn_rewards(-0.2, [True, True], 0.1)) == pytest.approx(-0.2)
    assert turn_rewards(1.0, [], 0.1) == []


def test_anchor_groups_exact_and_similar():
    a = "You are in the kitchen. On the countertop 1 you see a apple 1, a bowl 2, a knife 1 and a fork 3."
    near = a.replace("fork 3", "fork 2")
    other = "You are in the bathroom. You see a towel."
    assert anchor_groups([a, near, a, other]) == [0, 1, 0, 2]
    assert anchor_groups([a, near, a, other], similarity=0.95) == [0, 0, 0, 1]
    assert anchor_groups([near, other, a], similarity=0.95) == [0, 1, 0]  # against the group's first member


def test_step_advantages_normalisations_and_singletons():
    returns, groups = [0.25, 0.0, 0.5, 0.0, 0.0, 7.0], [0, 0, 1, 1, 1, 2]
    adv, sizes = step_advantages(returns, groups, "mean_norm")
    assert adv == pytest.approx([0.125, -0.125, 1 / 3, -1 / 6, -1 / 6, 0.0]) and sizes == [2, 2, 3, 3, 3, 1]
    adv, _ = step_advantages(returns, groups, "mean_std_norm")
    s0, s1 = 0.25 / math.sqrt(2), math.sqrt(1 / 12)  # unbiased stds
    expected = [0.125 / s0, -0.125 / s0, (1 / 3) / s1, -(1 / 6) / s1, -(1 / 6) / s1, 0.0]
    assert adv == pytest.approx(expected, rel=1e-5)
    assert step_advantages([1.0, 1.0], [0, 0], "mean_std_norm")[0] == [0.0, 0.0]  # equal returns: 0, not NaN
    with pytest.raises(ValueError, match="mean_norm"):
        step_advantages([1.0], [0], "std")


def test_gigpo_by_hand_repeated_states_singletons_and_penalties():
    # group 1 (G=2): A visits s0, s1, s2 and wins; B visits s0, s1, s1 (s1 twice: an invalid answer keeps the state),
    # s3 and loses with one penalised invalid answer. gamma = 0.5, omega = 1, penalty 0.1.
    anchors = [["s0", "s1", "s2"], ["s0", "s1", "s1", "s3"]]
    invalid = [[False, False, False], [False, True, False, False]]
    rewards = [1.0, -0.1]
    episode = [0.7, -0.7]
    per_turn, stats = gigpo_advantages(episode, rewards, anchors, invalid, 2, gamma=0.5, invalid_penalty=0.1)
    # returns: A [0.25, 0.5, 1]; B rewards [0, -0.1, 0, 0] -> [-0.05, -0.1, 0, 0]
    s0 = (0.25 - (-0.05)) / 2  # A0 - mean of {0.25, -0.05}
    mean_s1 = (0.5 - 0.1 + 0.0) / 3
    assert per_turn[0] == pytest.approx([0.7 + s0, 0.7 + 0.5 - mean_s1, 0.7])  # s2: singleton -> 0
    assert per_turn[1] == pytest.approx([-0.7 - s0, -0.7 - 0.1 - mean_s1, -0.7 - mean_s1, -0.7])
    assert stats.step_groups == 4 and stats.turns == 7 and stats.anchored_turns == 5
    assert stats.metrics()["gigpo/anchor_coverage"] == pytest.approx(5 / 7)
    # omega scales the step part only
    weighted, _ = gigpo_advantages(episode, rewards, anchors, invalid, 2, 0.5, 2.0, invalid_penalty=0.1)
    assert weighted[0][0] == pytest.approx(0.7 + 2 * s0)


def test_gigpo_groups_are_per_reset_and_failures_join_no_group():
    # two groups of G=3 sharing anchor texts: anchors never match across groups (different resets). In group 1 the
    # third episode failed at reset (NaN reward, no turns); in group 2 the second failed mid-episode (excluded: NaN).
    anchors = [["x"], ["x"], [], ["x", "y"], ["x", "y"], ["x"]]
    invalid = [[False], [False], [], [False, False], [False, False], [False]]
    rewards = torch.tensor([1.0, 0.0, NAN, 1.0, NAN, 0.0])
    episode = group_advantages(rewards, 3, "group").tolist()
    assert episode[2] == 0.0 and episode[4] == 0.0
    per_turn, stats = gigpo_advantages(episode, rewards.tolist(), anchors, invalid, 3, gamma=1.0)
    assert per_turn[0] == pytest.approx([episode[0] + 0.5]) and per_turn[1] == pytest.approx([episode[1] - 0.5])
    assert per_turn[2] == [] and per_turn[4] == [0.0, 0.0]
    # group 2: x is shared by episodes 3 and 5 (returns 1 and 0), y is a singleton (episode 4 is excluded)
    assert per_turn[3] == pytest.approx([episode[3] + 0.5, episode[3]])
    assert per_turn[5] == pytest.approx([episode[5] - 0.5])
    assert stats.turns == 5 and stats.anchored_turns == 4 and stats.step_groups == 3
    with pytest.raises(ValueError, match="groups of 4"):
        gigpo_advantages(episode, rewards.tolist(), anchors, invalid, 4)


def gigpo_args(tmp_path, **overrides):
    kwargs = dict(
        env_advantage_estimator="gigpo",
        env_advantage_baseline="rows",
        env_gigpo_step_norm="mean_std_norm",
        env_invalid_action_penalty=0.1,
    )
    kwargs.update(overrides)
    return EPOConfig(**windowed_config_kwargs(tmp_path, **kwargs))


def test_gigpo_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="env_advantage_estimator"):
        gigpo_args(tmp_path, env_advantage_estimator="gigpo2")
    with pytest.raises(ValueError, match="env_gigpo_gamma"):
        gigpo_args(tmp_path, env_gigpo_gamma=1.5)
    with pytest.raises(ValueError, match="env_gigpo_step_norm"):
        gigpo_args(tmp_path, env_gigpo_step_norm="std")
    with pytest.raises(ValueError, match="env_gigpo_similarity"):
        gigpo_args(tmp_path, env_gigpo_similarity=0.0)
    with pytest.raises(ValueError, match="env_gigpo_anchor"):
        gigpo_args(tmp_path, env_gigpo_anchor="prompt")
    with pytest.raises(ValueError, match="env_filter_max_rollouts"):
        gigpo_args(tmp_path, env_filter_groups=True, env_filter_max_rollouts=0)


def test_layouts_get_the_same_per_turn_advantages(tokenizer, make_model, tmp_path):
    """One real toy rollout, its rows in the step, packed and episode layouts: every action token carries its turn's
    GiGPO advantage, the same in each layout, and equal to the pure function's on the episodes."""
    trainer = EPOTrainer(
        make_model(),
        args=gigpo_args(tmp_path),
        train_dataset=make_dataset("train", 4),
        processing_class=tokenizer,
        env_factory=ToyEnv,
    )
    inputs = [dict(r) for r in make_dataset("train", 2) for _ in range(2)]
    batch = trainer._play_rollout_batch(inputs)
    rewards = trainer._episode_rewards(inputs, batch)
    episodes = batch.episodes
    assert sum(e.turns for e in episodes) > len(episodes)  # multi-turn episodes
    per_layout = {}
    for layout in ("step", "packed", "episode"):
        rows = [
            row
            for i, e in enumerate(episodes)
            for row in episode_rows(i, e.prompt_ids, e.completion_ids, e.env_mask, e.turn_ids, None, layout)
        ]
        trainer._assign_advantages(rows, rewards, batch)
        tokens = {}
        for row in rows:
            values = row.advantage if isinstance(row.advantage, list) else [row.advantage] * len(row.completion_ids)
            for value, m, t in zip(values, row.env_mask, row.turn_ids):
                if m:
                    tokens.setdefault((row.episode, t), set()).add(value)
                elif layout != "step":
                    assert value == 0.0  # never on observation tokens
        per_layout[layout] = tokens
    assert per_layout["step"] == per_layout["packed"] == per_layout["episode"]
    assert all(len(v) == 1 for v in per_layout["step"].values())  # one value per turn
    turns = [(e.anchor_keys(), e.invalid_answers) for e in episodes]
    assert all(len(a) == e.turns for (a, _), e in zip(turns, episodes))
    counts = torch.tensor([max(1, e.turns) for e in episodes], dtype=torch.float32)
    episode = group_advantages(rewards, 2, "group", "rows", counts).tolist()
    expected, _ = gigpo_advantages(
        episode, rewards.tolist(), [a for a, _ in turns], [i for _, i in turns], 2, 0.95, 1.0, "mean_std_norm",
        None, 0.1,
    )  # fmt: skip
    for (i, t), values in per_layout["step"].items():
        assert next(iter(values)) == pytest.approx(expected[i][t])
    # the observations are the env's own text, not the windowed prompt; the toy env repeats states in a group
    assert all(o and "Task:" not in o for e in episodes for o in e.observations)
    assert trainer._metrics["train"]["gigpo/anchor_coverage"][-1] > 0


def test_set_turn_advantages_on_a_row_without_actions():
    row = episode_rows(0, [1, 2], [3], [0], [0], None, "step")[0]
    set_turn_advantages([row], [[]])
    assert row.advantage == 0.0


def test_per_token_advantages_reach_the_loss_with_every_loss_type(tokenizer, make_model, tmp_path, monkeypatch):
    seen = []
    real = RowTrainingMixin._chunk_inputs

    def chunk_inputs(self, chunk, counts):
        inputs = real(self, chunk, counts)
        seen.append((self.loss_type, inputs["advantages"].clone(), inputs["tool_mask"].clone()))
        return inputs

    monkeypatch.setattr(RowTrainingMixin, "_chunk_inputs", chunk_inputs)
    for loss_type, epo in (("grpo", 1e-3), ("dapo", 1e-3), ("bnpo", 0.0)):  # EPO on, and off
        args = gigpo_args(tmp_path / loss_type, env_sample_layout="packed", loss_type=loss_type, epo_entropy_coef=epo)
        trainer = EPOTrainer(
            make_model(),
            args=args,
            train_dataset=make_dataset("train", 4),
            processing_class=tokenizer,
            env_factory=ToyEnv,
        )
        trainer.train()
        log = next(h for h in trainer.state.log_history if "loss" in h)
        assert math.isfinite(log["loss"]) and "gigpo/step_adv_std" in log and "gigpo/step_groups" in log
    for _, advantages, mask in seen:
        assert advantages.dim() == 2 and (advantages[mask == 0] == 0).all()


def test_grpo_rows_baseline_weighs_turns_in_every_layout(tokenizer, make_model, tmp_path):
    """GRPO with `env_advantage_baseline="rows"`: an episode weighs its turns in the baseline, also when the packed
    or episode layout gives it one row (before, those layouts fell back to the episode baseline)."""
    from types import SimpleNamespace

    trainer = EPOTrainer(
        make_model(),
        args=gigpo_args(tmp_path, env_advantage_estimator="grpo", num_generations=2),
        train_dataset=make_dataset("train", 4),
        processing_class=tokenizer,
        env_factory=ToyEnv,
    )

    def built(turns):  # prompt 2 tokens; each turn: 2 action tokens, then 1 observation token
        completion, mask, ids = [], [], []
        for t in range(turns):
            completion += [5, 6, 7]
            mask += [1, 1, 0]
            ids += [t, t, t]
        return SimpleNamespace(prompt_ids=[1, 2], completion_ids=completion, env_mask=mask, turn_ids=ids, turns=turns)

    episodes = [built(3), built(1), built(2), built(1)]
    batch = SimpleNamespace(episodes=episodes)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    counts = torch.tensor([3.0, 1.0, 2.0, 1.0])
    expected = group_advantages(rewards, 2, trainer.scale_rewards, "rows", counts).tolist()
    assert expected[0] != pytest.approx(-expected[1])  # unequal weights: differs from the episode baseline
    for layout in ("step", "packed", "episode"):
        rows = [
            row
            for i, e in enumerate(episodes)
            for row in episode_rows(i, e.prompt_ids, e.completion_ids, e.env_mask, e.turn_ids, None, layout)
        ]
        trainer._assign_advantages(rows, rewards, batch)
        assert all(row.advantage == pytest.approx(expected[row.episode]) for row in rows), layout
