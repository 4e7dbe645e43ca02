"""Episodes -> rows -> optimizer steps (trl_epo.rows), on hand-made data: the turn split, advantages per episode
(GRPO's group baseline and verl-agent's row baseline, with excluded env failures), every row scheduled exactly once
with whole episodes per step, Eq. 2 weights with global normalisers, token-budgeted chunks."""

import math

import pytest
import torch

from trl_epo.importance import importance_ratios
from trl_epo.rows import (
    StepCounts,
    TrainingRow,
    balanced_bins,
    collate,
    episode_rows,
    group_advantages,
    resolve_layout,
    schedule_rows,
    set_epo_weights,
    token_chunks,
)


def windowed_episode():
    """Three turns: prompt [1, 2] / answer 10, 11 | block [3, 4] / answer 12 | block [5] / answer 13, 14, 15."""
    completion = [10, 11, 3, 4, 12, 5, 13, 14, 15]
    mask = [1, 1, 0, 0, 1, 0, 1, 1, 1]
    turns = [0, 0, 1, 1, 1, 2, 2, 2, 2]
    logprobs = [-0.1, -0.2, 0.0, 0.0, -0.3, 0.0, -0.4, -0.5, -0.6]
    return [1, 2], completion, mask, turns, logprobs


def test_step_rows_are_the_turns_with_their_own_prompts():
    prompt, completion, mask, turns, logprobs = windowed_episode()
    rows = episode_rows(7, prompt, completion, mask, turns, logprobs, "step")
    assert [(r.prompt_ids, r.completion_ids) for r in rows] == [
        ([1, 2], [10, 11]),
        ([3, 4], [12]),
        ([5], [13, 14, 15]),
    ]
    assert [r.turn_ids for r in rows] == [[0, 0], [1], [2, 2, 2]]
    assert [r.logprobs for r in rows] == [[-0.1, -0.2], [-0.3], [-0.4, -0.5, -0.6]]
    assert all(r.episode == 7 and all(r.env_mask) for r in rows)
    (packed,) = episode_rows(7, prompt, completion, mask, turns, logprobs, "packed")
    assert packed.completion_ids == completion and packed.env_mask == mask
    # An episode without any answer (env failure at reset) keeps one row without action tokens.
    (empty,) = episode_rows(0, [1, 2], [0], [0], [0], None, "step")
    assert empty.action_tokens == 0


def test_layout_resolution():
    assert resolve_layout(None, windowed=True) == "step" and resolve_layout(None, windowed=False) == "episode"
    assert resolve_layout("packed", windowed=True) == "packed"
    with pytest.raises(ValueError, match="windowed prompts"):
        resolve_layout("step", windowed=False)
    with pytest.raises(ValueError, match="supported"):
        resolve_layout("nonsense", windowed=True)


def test_episode_baseline_is_trls_group_normalisation_and_excludes_failures():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, float("nan"), 0.0, 1.0, 0.0])
    advantages = group_advantages(rewards, num_generations=4)
    for group in (slice(0, 4), slice(4, 8)):
        r = rewards[group]
        valid = r[~r.isnan()]
        expected = torch.nan_to_num((r - valid.mean()) / (valid.std() + 1e-4), nan=0.0)
        assert advantages[group] == pytest.approx(expected.tolist(), abs=1e-6)
    assert advantages[4] == 0.0  # the excluded env failure: no advantage, not part of its group's baseline
    # One success among two real zeros: with the failure counted as a 0 the success would get 1.5 / std(1,0,0,0)
    # instead of its own group's 2/3 / std(1,0,0) (the bias `env_error_reward="zero"` had).
    assert advantages[6] == pytest.approx((1 - 1 / 3) / (torch.tensor([0.0, 1.0, 0.0]).std().item() + 1e-4), abs=1e-5)


def test_rows_baseline_weights_each_episode_by_its_rows():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    rows = torch.tensor([3.0, 1.0, 2.0, 2.0])  # turn rows of each episode, one group of 4
    advantages = group_advantages(rewards, 4, baseline="rows", rows_per_episode=rows)
    expanded = torch.tensor([1.0] * 3 + [0.0] * 1 + [0.0] * 2 + [1.0] * 2)  # every turn row carries its reward
    mean, std = expanded.mean(), expanded.std()
    assert advantages.tolist() == pytest.approx(((rewards - mean) / (std + 1e-6)).tolist(), abs=1e-6)
    none = group_advantages(rewards, 4, scale_rewards="none", baseline="rows", rows_per_episode=rows)
    assert none.tolist() == pytest.approx((rewards - mean).tolist(), abs=1e-6)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_equal_rewards_give_exactly_zero_advantages_with_either_baseline(scale_rewards):
    # Rewards like won - 0.1 * invalid_turns: float32 rounding of a row-weighted mean, divided by std + 1e-6 (std ~1e-8
    # then), used to give |A| up to 0.056. A group whose rewards all agree has nothing to learn: exactly 0.
    rows = torch.tensor([3, 7, 5, 11, 30, 1, 2, 17, 4, 4, 9, 13, 22, 6, 8, 1])
    for value in [won - 0.1 * invalid for won in (0, 1) for invalid in range(8)]:
        rewards = torch.full((16,), value)
        rewards[5] = float("nan")  # an excluded env failure changes nothing
        for baseline in ("rows", "episode"):
            advantages = group_advantages(rewards, 4, scale_rewards, baseline, rows)
            assert torch.count_nonzero(advantages) == 0, (value, baseline)


def make_rows(turns_per_episode, length=5):
    rows = []
    for e, turns in enumerate(turns_per_episode):
        for t in range(turns):
            rows.append(TrainingRow([1] * length, [2] * (t + 1), [1] * (t + 1), [t] * (t + 1), episode=e))
    return rows


def test_every_row_is_scheduled_once_and_episodes_stay_whole():
    rows = make_rows([3, 1, 4, 2, 5, 1, 1])
    steps, counts = schedule_rows(rows, num_steps=3, micro_steps=2)
    scheduled = [id(r) for step in steps for micro in step for r in micro]
    assert sorted(scheduled) == sorted(id(r) for r in rows)  # none dropped, none duplicated
    for k, step in enumerate(steps):
        members = [r for micro in step for r in micro]
        assert counts[k].tolist() == [
            len(members),
            sum(r.action_tokens for r in members),
            len({r.episode for r in members}),
        ]
    step_of = {r.episode: k for k, step in enumerate(steps) for micro in step for r in micro}
    assert all(step_of[r.episode] == k for k, step in enumerate(steps) for micro in step for r in micro)
    loads = [sum(r.length for micro in step for r in micro) for step in steps]
    assert max(loads) - min(loads) <= max(r.length for r in rows) * 5  # balanced within one episode's size


def test_balanced_bins_is_deterministic_and_fills_every_bin():
    sizes = [9, 1, 8, 2, 7, 3]
    assert balanced_bins(sizes, 3) == balanced_bins(sizes, 3)
    bins = balanced_bins(sizes, 3)
    assert sorted(sum(s for s, b in zip(sizes, bins) if b == k) for k in range(3)) == [10, 10, 10]


def test_eq2_weights_use_the_global_trajectory_count():
    # Three episodes in this process's share of a step; one had no action tokens (env failure at reset). Globally
    # (other processes included) the step holds B = 6 counted trajectories: each counted trajectory weighs 1/6.
    rows = make_rows([2, 3])
    rows.append(TrainingRow([1, 2], [0], [0], [0], episode=2))
    set_epo_weights(rows, StepCounts(rows=12, action_tokens=40, trajectories=6), "trajectory")
    per_episode = {}
    for r in rows:
        per_episode[r.episode] = per_episode.get(r.episode, 0.0) + sum(r.epo_weights)
    assert per_episode[0] == pytest.approx(1 / 6) and per_episode[1] == pytest.approx(1 / 6)
    assert per_episode[2] == 0.0
    # inside an episode, turns weigh the same whatever their lengths (token mean per turn, mean over turns)
    episode1 = [r for r in rows if r.episode == 1]
    assert [sum(r.epo_weights) for r in episode1] == pytest.approx([1 / 18] * 3)
    set_epo_weights(rows, StepCounts(rows=12, action_tokens=40, trajectories=6), "token")
    assert all(w == pytest.approx(1 / 40) for r in rows for w, m in zip(r.epo_weights, r.env_mask) if m)


def test_token_chunks_respect_the_budget_and_bound_the_padding():
    lengths = [10, 3, 7, 7, 2, 30, 9, 10]
    chunks = token_chunks(lengths, budget=20)
    assert sorted(i for c in chunks for i in c) == list(range(8))
    for chunk in chunks:
        width = max(lengths[i] for i in chunk)
        assert width * len(chunk) <= 20 or len(chunk) == 1  # a row longer than the budget goes alone
        assert 1 - sum(lengths[i] for i in chunk) / (width * len(chunk)) <= 0.1
    assert [sorted(c) for c in token_chunks([10, 10, 9, 2], None)] == [[0, 1, 2], [3]]  # 2 would pad a 10-wide chunk


def test_collate_pads_whole_sequences_left_and_aligns_completions():
    rows = [
        TrainingRow([1, 2, 3], [4], [1], [0], 0, advantage=0.5, epo_weights=[1.0]),
        TrainingRow([5], [6, 7], [1, 0], [1, 1], 1, advantage=-1.0, epo_weights=[0.5, 0.0]),
    ]
    batch = collate(rows, pad_token_id=0)
    # widths: rows of 4 and 3 tokens -> 4 columns; completion region = the last 2 (the longest completion)
    assert batch["prompt_ids"].tolist() == [[1, 2], [0, 5]]
    assert batch["prompt_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["completion_ids"].tolist() == [[3, 4], [6, 7]]
    assert batch["completion_mask"].tolist() == [[1, 1], [1, 1]]  # row 0's prompt tail is attended ...
    assert batch["tool_mask"].tolist() == [[0, 1], [1, 0]]  # ... but never trained
    assert batch["turn_ids"].tolist() == [[-1, 0], [1, 1]] and batch["epo_weights"].tolist() == [[0, 1], [0.5, 0]]
    assert batch["advantages"].tolist() == [0.5, -1.0] and "old_per_token_logps" not in batch
    per_token = collate(
        [
            TrainingRow([1], [2, 3], [1, 1], [0, 0], 0, advantage=[0.1, 0.2]),
            TrainingRow([4, 5], [6], [1], [0], 1, advantage=0.7),
        ],
        0,
    )
    assert per_token["advantages"].flatten().tolist() == pytest.approx([0.1, 0.2, 0.0, 0.7])


def test_turn_importance_ratios_multiply_within_a_turn_only():
    old = torch.tensor([[-1.0, -1.0, -2.0, -2.0]])
    sampling = torch.tensor([[-1.1, -1.2, -2.0, -1.5]])
    mask = torch.ones(1, 4)
    turns = torch.tensor([[0, 0, 1, 1]])
    ratio = importance_ratios(old, sampling, mask, turns, "turn_truncate", None, 3.0)
    assert ratio[0, :2].tolist() == pytest.approx([math.exp(0.3)] * 2, rel=1e-5)
    assert ratio[0, 2:].tolist() == pytest.approx([math.exp(-0.5)] * 2, rel=1e-5)
    token = importance_ratios(old, sampling, mask, turns, "token_mask", 0.7, 1.15)
    assert token[0].tolist() == pytest.approx([math.exp(0.1), 0.0, 1.0, 0.0], rel=1e-5)  # exp(0.2) > 1.15 masked


def _paper_shaped_rollout(seed=0):
    """16 episodes (one process of the ScienceWorld paper configs): successes of 4-10 turns, failures of 30."""
    import random

    rng = random.Random(seed)
    rows, won = [], {}
    for e in range(16):
        won[e] = rng.random() < 0.4
        for t in range(rng.randint(4, 10) if won[e] else 30):
            rows.append(TrainingRow([1] * 200, [2] * 6, [1] * 6, [t] * 6, episode=e))
    return rows, won


def _episode_weights(steps, step_counts):
    """Each episode's per-token (dapo: 1/N) and per-episode (Eq. 2: 1/B) weight in the step it landed in."""
    token, episode = {}, {}
    for step, counts in zip(steps, step_counts):
        for micro in step:
            for r in micro:
                token[r.episode] = 1.0 / counts.action_tokens
                episode[r.episode] = 1.0 / counts.trajectories
    return token, episode


def test_k_updates_weigh_every_episode_alike_whatever_its_step():
    # K = 16 steps of one episode each: normalised per step, a 5-turn success's tokens would weigh 6x a 30-turn
    # failure's. With the rollout's counts / K every token and every episode weighs the same in every step.
    from trl_epo.rows import rollout_step_counts

    rows, won = _paper_shaped_rollout()
    steps, counts = schedule_rows(rows, num_steps=16, micro_steps=1, seed=3)
    assert all(len({r.episode for r in step[0]}) == 1 for step in steps)  # one episode per step
    step_counts = rollout_step_counts(counts)
    token, episode = _episode_weights(steps, step_counts)
    n, b = counts[:, 1].sum().item(), counts[:, 2].sum().item()
    assert all(math.isclose(w, 16 / n) for w in token.values())
    assert all(math.isclose(w, 16 / b) for w in episode.values())
    # The same weights as one step over the whole rollout (K = 1), up to the factor K.
    (single,), one = schedule_rows(rows, num_steps=1, micro_steps=1, seed=3)
    (k1,) = rollout_step_counts(one)
    assert math.isclose(k1.action_tokens, n) and math.isclose(k1.trajectories, b)
    # Each step's total token weight is its share of the rollout x K: K in all.
    totals = [sum(r.action_tokens for r in step[0]) / c.action_tokens for step, c in zip(steps, step_counts)]
    assert math.isclose(sum(totals), 16.0)


def test_episodes_are_dealt_to_steps_at_random_not_longest_first():
    rows, won = _paper_shaped_rollout()
    length = {e: sum(r.length for r in rows if r.episode == e) for e in won}
    firsts = set()
    for seed in range(8):
        steps, _ = schedule_rows(rows, num_steps=16, micro_steps=1, seed=seed)
        order = [step[0][0].episode for step in steps]
        assert sorted(order) == sorted(won)  # every episode once
        firsts.add(order[0])
        assert [length[e] for e in order] != sorted((length[e] for e in order), reverse=True)
    assert len(firsts) > 2  # the first update does not always see the longest episode
    again, _ = schedule_rows(rows, num_steps=16, micro_steps=1, seed=5)
    steps, _ = schedule_rows(rows, num_steps=16, micro_steps=1, seed=5)
    assert [s[0][0].episode for s in again] == [s[0][0].episode for s in steps]  # a seed reproduces the deal
    # More episodes than steps: still balanced by tokens within about one episode.
    loads = [sum(r.length for r in step[0]) for step in schedule_rows(rows, num_steps=4, micro_steps=1, seed=1)[0]]
    assert max(loads) - min(loads) <= max(length.values())
