"""The EPO math on hand-made tensors (objective.py): Eq. 2 aggregation, Eqs. 3-4 corridor, Eq. 5 phase weight and
the entropy reference."""

import math

import pytest
import torch

from trl_epo.objective import (
    EntropyReference,
    StepEntropy,
    corridor_penalty,
    epo_regularizer,
    out_of_corridor,
    phase_weight,
    token_weights,
    trajectory_mean,
    trajectory_weights,
)


def test_trajectory_mean_matches_hand_computation():
    # Row 0: turn 0 = 2 action tokens, 1 env token, turn 1 = 3 action tokens, then padding.
    # Row 1: one turn of 4 action tokens then padding. Row 2: turns 0..2, uneven, with env tokens between.
    values = torch.tensor(
        [
            [1.0, 3.0, 99.0, 2.0, 4.0, 6.0, 77.0, 77.0],
            [5.0, 5.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            [2.0, 99.0, 4.0, 8.0, 99.0, 1.0, 0.0, 0.0],
        ]
    )
    mask = torch.tensor(
        [
            [1, 1, 0, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 0, 1, 1, 0, 1, 0, 0],
        ]
    )
    turn_ids = torch.tensor(
        [
            [0, 0, 0, 1, 1, 1, -1, -1],
            [0, 0, 0, 0, -1, -1, -1, -1],
            [0, 0, 1, 1, 1, 2, -1, -1],
        ]
    )
    traj0 = ((1 + 3) / 2 + (2 + 4 + 6) / 3) / 2
    traj1 = (5 + 5 + 1 + 1) / 4
    traj2 = (2 / 1 + (4 + 8) / 2 + 1 / 1) / 3
    expected = (traj0 + traj1 + traj2) / 3
    assert trajectory_mean(values, mask, turn_ids).item() == pytest.approx(expected, rel=1e-6)
    weights = trajectory_weights(mask, turn_ids)
    assert torch.all(weights[mask == 0] == 0)
    assert weights.sum().item() == pytest.approx(1.0, rel=1e-6)


def test_long_single_turn_and_short_multi_turn_trajectories_weigh_equally():
    # Trajectory A: one turn of 10 tokens; trajectory B: 5 turns of 2 tokens.
    mask = torch.ones(2, 10)
    turn_ids = torch.tensor([[0] * 10, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]])
    weights = trajectory_weights(mask, turn_ids)
    assert weights[0].sum().item() == pytest.approx(0.5)
    assert weights[1].sum().item() == pytest.approx(0.5)
    # Inside B every turn weighs the same regardless of its length.
    mask_b = torch.tensor([[1.0] * 10])
    turns_b = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    w = trajectory_weights(mask_b, turns_b)
    assert w[0, 0].item() == pytest.approx(0.5)
    assert w[0, 1:].sum().item() == pytest.approx(0.5)


def test_rows_of_one_trajectory_share_the_trajectory_weight():
    # One trajectory split into a row per turn (traj_ids) equals the same trajectory in one row.
    values = torch.tensor([[1.0, 2.0, 0.0], [3.0, 5.0, 7.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    turn_ids = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 0, 0]])
    traj_ids = torch.tensor([7, 7, 9])
    split = (trajectory_weights(mask, turn_ids, traj_ids) * values).sum()
    expected = ((1.5 + 5.0) / 2 + 4.0) / 2
    assert split.item() == pytest.approx(expected)


def test_without_turn_ids_each_row_is_one_turn():
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert trajectory_mean(values, mask).item() == pytest.approx((2.0 + 10.0) / 2)
    assert (token_weights(mask) * values).sum().item() == pytest.approx(16.0 / 4)


def test_rows_without_action_tokens_do_not_count():
    values = torch.tensor([[1.0, 3.0], [100.0, 100.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    assert trajectory_mean(values, mask).item() == pytest.approx(2.0)


def test_negative_turn_ids_on_counted_tokens_are_rejected():
    with pytest.raises(ValueError, match="turn_ids"):
        trajectory_weights(torch.ones(1, 2), torch.tensor([[0, -1]]))


@pytest.mark.parametrize("aggregation", ["trajectory", "token"])
def test_corridor_gradient_is_minus_alpha_zero_plus_alpha_per_unit(aggregation):
    # Reference 1.0, corridor [0.5, 1.5]: tokens below, inside and above it.
    entropy = torch.tensor([[0.2, 1.0, 2.5, 0.3], [1.2, 3.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    turn_ids = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    weights = trajectory_weights(mask, turn_ids) if aggregation == "trajectory" else token_weights(mask)
    alpha = 0.1
    terms = epo_regularizer(
        entropy,
        weights,
        mask,
        entropy_coef=1.0,
        beta=1.0,
        reference=1.0,
        alpha=alpha,
        kappa_low=0.5,
        kappa_high=1.5,
    )
    penalty = alpha * (weights * corridor_penalty(entropy, 1.0, 0.5, 1.5)).sum()
    (grad,) = torch.autograd.grad(penalty, entropy)
    per_unit = torch.where(weights > 0, grad / weights.clamp(min=1e-12), torch.zeros_like(grad))
    expected = torch.tensor([[-alpha, 0.0, alpha, -alpha], [0.0, alpha, 0.0, 0.0]])
    torch.testing.assert_close(per_unit, expected, rtol=1e-5, atol=1e-7)
    assert terms.smooth_penalty.item() == pytest.approx(penalty.item())
    assert terms.out_of_corridor_frac.item() == pytest.approx(4 / 6)
    # The full regulariser: -lambda*w (bonus) + lambda*beta*alpha*w*sign (corridor).
    (grad_full,) = torch.autograd.grad(terms.regularizer, entropy)
    torch.testing.assert_close(grad_full, -weights + weights * expected, rtol=1e-5, atol=1e-7)


def test_smoothing_none_has_exactly_zero_corridor_gradient():
    entropy = torch.tensor([[0.1, 5.0, 1.0]], requires_grad=True)
    mask = torch.ones(1, 3)
    weights = trajectory_weights(mask)
    terms = epo_regularizer(
        entropy,
        weights,
        mask,
        entropy_coef=0.5,
        beta=2.0,
        reference=1.0,
        alpha=0.3,
        kappa_low=0.5,
        kappa_high=1.5,
        smoothing="none",
    )
    (grad,) = torch.autograd.grad(terms.regularizer, entropy)
    assert torch.equal(grad, -0.5 * weights)  # the bonus alone, bit for bit
    assert terms.smooth_penalty.item() == 0.0


def test_no_penalty_without_history():
    entropy = torch.tensor([[0.1, 5.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    terms = epo_regularizer(entropy, token_weights(mask), mask, 1.0, 2.0, None, 0.1, 0.0, 2.0)
    assert terms.smooth_penalty.item() == 0.0
    assert terms.out_of_corridor_frac.item() == 0.0


def test_out_of_corridor_mask():
    h = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    assert out_of_corridor(h, 1.0, 0.5, 1.5).tolist() == [True, False, False, False, True]


def test_phase_weight():
    K, gamma = 100, 3.0
    assert phase_weight(0, K, gamma) == 2.0
    assert phase_weight(K // 2, K, gamma) == pytest.approx(1 + math.exp(-gamma))
    betas = [phase_weight(k, K, gamma) for k in range(K)]
    assert all(a > b for a, b in zip(betas, betas[1:]))
    assert all(1.0 < b <= 2.0 for b in betas)
    assert phase_weight(7, K, gamma, schedule="constant") == 1.0
    assert phase_weight(0, 1, gamma) == 2.0  # K = 1 is defined
    with pytest.raises(ValueError):
        phase_weight(0, K, gamma, schedule="linear")


def test_cumulative_reference_is_exact():
    ref = EntropyReference("cumulative")
    assert ref.value() is None and ref.per_token(torch.zeros(2, 2, dtype=torch.long)) is None
    steps = [2.0, 1.0, 4.5, 0.5]
    for i, h in enumerate(steps):
        ref.update(StepEntropy(mean=h, turn_means={0: h}))
        assert ref.value() == pytest.approx(sum(steps[: i + 1]) / (i + 1))
    assert ref.history == steps
    ref.update(StepEntropy(mean=float("nan"), turn_means={}))  # a step with no action tokens is ignored
    assert ref.num_updates == 4


def test_per_turn_ema_window_references():
    per_turn = EntropyReference("per_turn")
    per_turn.update(StepEntropy(mean=1.0, turn_means={0: 2.0, 1: 0.5}))
    per_turn.update(StepEntropy(mean=2.0, turn_means={0: 4.0}))
    assert per_turn.turn_value(0) == pytest.approx(3.0)
    assert per_turn.turn_value(1) == pytest.approx(0.5)
    assert per_turn.turn_value(5) == pytest.approx(1.5)  # unseen turn: cumulative fallback
    table = per_turn.per_token(torch.tensor([[0, 1, 5, -1]]))
    torch.testing.assert_close(table, torch.tensor([[3.0, 0.5, 1.5, 3.0]]))

    ema = EntropyReference("ema", ema_decay=0.5)
    for h in (4.0, 2.0, 0.0):
        ema.update(StepEntropy(mean=h, turn_means={}))
    assert ema.value() == pytest.approx(0.5 * (0.5 * 4.0 + 0.5 * 2.0) + 0.0)

    window = EntropyReference("window", window=2)
    for h in (10.0, 2.0, 4.0):
        window.update(StepEntropy(mean=h, turn_means={}))
    assert window.value() == pytest.approx(3.0)


@pytest.mark.parametrize("mode", EntropyReference.MODES)
def test_reference_state_dict_round_trip(mode):
    import json

    ref = EntropyReference(mode, ema_decay=0.7, window=3)
    for i in range(5):
        ref.update(StepEntropy(mean=1.0 + i, turn_means={0: 1.0 + i, 2: 0.5 * i}))
    clone = EntropyReference(mode, ema_decay=0.7, window=3)
    clone.load_state_dict(json.loads(json.dumps(ref.state_dict())))
    assert clone == ref
    assert clone.value() == ref.value() and clone.turn_value(2) == ref.turn_value(2)
    with pytest.raises(ValueError, match="epo_reference"):
        EntropyReference("ema" if mode != "ema" else "window").load_state_dict(ref.state_dict())


def test_reference_rejects_bad_settings():
    with pytest.raises(ValueError):
        EntropyReference("median")
    with pytest.raises(ValueError):
        EntropyReference("ema", ema_decay=1.0)
    with pytest.raises(ValueError):
        EntropyReference("window", window=0)
