"""PPO's critic-side math on hand-made numbers: token rewards, GAE over action tokens across turns and rows,
whitening, the clipped value loss and its gradient, the explained variance."""

import math

import pytest
import torch

from trl_epo.ppo import gae as G


# One episode of two turns: turn 0 answers with 2 tokens (an invalid answer: penalty 0.1), the environment replies
# with 2 tokens, turn 1 answers with 3 tokens. The episode reward (as the env reward computes it) is 1 - 0.1 = 0.9.
PACKED_MASK = [1, 1, 0, 0, 1, 1, 1]
PACKED_TURNS = [0, 0, 1, 1, 1, 1, 1]
PACKED_VALUES = [0.1, 0.2, 9.0, 9.0, 0.3, 0.4, 0.5]  # the values on environment tokens must not matter
REWARD, PENALTIES = 0.9, {0: 0.1}


def test_token_rewards_put_penalties_on_their_turn_and_the_rest_on_the_last_token():
    rewards = G.action_token_rewards([0, 0, 1, 1, 1], REWARD, PENALTIES)
    assert rewards == pytest.approx([0.0, -0.1, 0.0, 0.0, 1.0])
    assert sum(rewards) == pytest.approx(REWARD)
    assert G.action_token_rewards([0, 0], 1.0) == [0.0, 1.0]
    assert G.action_token_rewards([], 1.0) == []


def test_gae_over_action_tokens_across_turns_equals_the_hand_computation():
    # gamma = 0.9, lam = 0.5; action-token values 0.1 .. 0.5, token rewards [0, -0.1, 0, 0, 1.0]:
    #   d4 = 1.0 - 0.5 = 0.5                     A4 = 0.5
    #   d3 = 0.9 * 0.5 - 0.4 = 0.05              A3 = 0.05 + 0.45 * 0.5      = 0.275
    #   d2 = 0.9 * 0.4 - 0.3 = 0.06              A2 = 0.06 + 0.45 * 0.275    = 0.18375
    #   d1 = -0.1 + 0.9 * 0.3 - 0.2 = -0.03      A1 = -0.03 + 0.45 * 0.18375 = 0.0526875
    #   d0 = 0.9 * 0.2 - 0.1 = 0.08              A0 = 0.08 + 0.45 * 0.0526875 = 0.103709375
    expected = [0.103709375, 0.0526875, 0.0, 0.0, 0.18375, 0.275, 0.5]  # 0 on the environment tokens
    (advantages,), (returns,) = G.episode_gae(
        [PACKED_MASK], [PACKED_TURNS], [PACKED_VALUES], REWARD, PENALTIES, gamma=0.9, lam=0.5
    )
    assert advantages == pytest.approx(expected)
    assert returns == pytest.approx([a + v if m else 0.0 for a, v, m in zip(expected, PACKED_VALUES, PACKED_MASK)])


def test_gamma_lambda_one_gives_return_minus_value():
    (advantages,), (returns,) = G.episode_gae([PACKED_MASK], [PACKED_TURNS], [PACKED_VALUES], REWARD, PENALTIES)
    # Returns (sums of the rewards still to come): 0.9, 0.9 for turn 0; 1.0 for each token of turn 1.
    assert advantages == pytest.approx([0.9 - 0.1, 0.9 - 0.2, 0, 0, 1.0 - 0.3, 1.0 - 0.4, 1.0 - 0.5])
    assert returns == pytest.approx([0.9, 0.9, 0, 0, 1.0, 1.0, 1.0])
    plain, _ = G.gae([0.0, 0.0, 2.0], [0.5, 1.0, 1.5])
    assert plain == pytest.approx([1.5, 1.0, 0.5])


def test_per_turn_rows_run_gae_over_the_whole_episode_then_split():
    # The same episode as one row per turn (the step layout: environment tokens are in the prompts, not the answers)
    # gets exactly the packed row's advantages on its action tokens: GAE does not restart at a row boundary.
    (packed_adv,), (packed_ret,) = G.episode_gae(
        [PACKED_MASK], [PACKED_TURNS], [PACKED_VALUES], REWARD, PENALTIES, gamma=0.9, lam=0.5
    )
    rows_adv, rows_ret = G.episode_gae(
        [[1, 1], [1, 1, 1]], [[0, 0], [1, 1, 1]], [[0.1, 0.2], [0.3, 0.4, 0.5]], REWARD, PENALTIES, 0.9, 0.5
    )
    action = [i for i, m in enumerate(PACKED_MASK) if m]
    assert rows_adv[0] + rows_adv[1] == pytest.approx([packed_adv[i] for i in action])
    assert rows_ret[0] + rows_ret[1] == pytest.approx([packed_ret[i] for i in action])
    # GAE restarted per row would give turn 0 a different advantage (its row's last token would look terminal).
    restarted, _ = G.gae(G.action_token_rewards([0, 0], 0.0, PENALTIES), [0.1, 0.2], 0.9, 0.5)
    assert restarted != pytest.approx(rows_adv[0])


def test_whitening_over_the_batch():
    sequences = [[1.0, 2.0], [3.0], [4.0, 5.0, 6.0]]
    mean, std = G.mean_and_std(G.moments(sequences[:2]) + G.moments(sequences[2:]))  # summed as over processes
    assert mean == pytest.approx(3.5) and std == pytest.approx(math.sqrt(17.5 / 5))  # unbiased
    whitened = [x for s in sequences for x in G.whiten(s, mean, std)]
    assert sum(whitened) == pytest.approx(0.0, abs=1e-9)
    assert sum(x * x for x in whitened) / 5 == pytest.approx(1.0, rel=1e-6)


def test_clipped_value_loss_and_its_gradient_on_hand_made_tensors():
    values = torch.tensor([[1.0, 0.0, 2.0, 0.6]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.0, 0.0, 1.0]])
    weights = torch.full((1, 4), 0.25)
    loss, clipped = G.clipped_value_loss(values, old, returns, weights, cliprange=0.2)
    # token 0: V moved +0.5 > 0.2, V_clip = 0.7: max(1, 1.69) = 1.69, clipped -> no gradient
    # token 1: V moved -0.5, V_clip = 0.3: max(0, 0.09) = 0.09, clipped -> no gradient
    # token 2: V_clip = 0.7: max(4, 0.49) = 4 (unclipped) -> gradient w * (V - R) = 0.25 * 2 = 0.5
    # token 3: inside the range: (0.6 - 1)^2 = 0.16 -> gradient 0.25 * (0.6 - 1) = -0.1
    assert loss.item() == pytest.approx(0.5 * 0.25 * (1.69 + 0.09 + 4.0 + 0.16))
    assert clipped.item() == pytest.approx(0.5)  # tokens 0 and 1
    loss.backward()
    assert values.grad[0].tolist() == pytest.approx([0.0, 0.0, 0.5, -0.1])

    plain = torch.tensor([[1.0, 0.0, 2.0, 0.6]], requires_grad=True)
    loss, clipped = G.clipped_value_loss(plain, old, returns, weights, cliprange=None)
    assert loss.item() == pytest.approx(0.5 * 0.25 * (1.0 + 0.0 + 4.0 + 0.16)) and clipped.item() == 0.0
    loss.backward()
    assert plain.grad[0].tolist() == pytest.approx([-0.25, 0.0, 0.5, -0.1])


def test_explained_variance():
    returns = [1.0, 2.0, 3.0, 4.0]
    assert G.explained_variance(G.explained_variance_sums(returns, returns)) == pytest.approx(1.0)
    assert G.explained_variance(G.explained_variance_sums(returns, [2.5] * 4)) == pytest.approx(0.0)
    halves = G.explained_variance_sums(returns[:2], [0.0, 0.0]) + G.explained_variance_sums(returns[2:], [0.0, 0.0])
    assert G.explained_variance(halves) == pytest.approx(0.0)  # V = 0: R - V varies exactly as R
    assert math.isnan(G.explained_variance(G.explained_variance_sums([1.0, 1.0], [0.2, 0.7])))
