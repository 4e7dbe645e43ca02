"""PPO's critic-side math as pure functions: per-token rewards of an episode, GAE over its action tokens, batch
whitening, the clipped value loss and the explained variance. No trainer, model or process here.

An episode is seen as the sequence of its *action tokens* (the tokens the policy generated, over all its turns, in
order); environment and template tokens are not actions, take no step and are skipped. Token i of that sequence is
the action a_i taken in state s_i (everything before it); the episode ends after its last action token.

    r_i      reward of a_i: 0, except a turn's penalty on its last token and the episode reward on the last token
    delta_i  = r_i + gamma * V(s_{i+1}) - V(s_i),        V(s_n) = 0 (terminal)          (Schulman et al. 2016, Eq. 11)
    A_i      = sum_l (gamma * lam)^l * delta_{i+l}       = delta_i + gamma * lam * A_{i+1}               (Eq. 16)
    R_i      = A_i + V(s_i)                              (the TD(lambda) return: the critic's regression target)

With gamma = lam = 1 (the reference's setting) A_i = (sum of the rewards from i on) - V(s_i): the episode's return
minus the value. Truncated episodes are treated as terminal too, as in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def action_token_rewards(
    turn_ids: Sequence[int], episode_reward: float, turn_penalties: Mapping[int, float] | None = None
) -> list[float]:
    """The reward of each action token of an episode (tokens in order, `turn_ids` their turns).

    A turn's penalty (e.g. `env_invalid_action_penalty` for an invalid answer, as a positive number) is paid on the
    last token of that turn; the rest of `episode_reward` sits on the episode's last action token, so the token
    rewards sum to `episode_reward` (which already includes the penalties, as the env reward function computes it).
    """
    n = len(turn_ids)
    rewards = [0.0] * n
    if n == 0:
        return rewards
    last_of_turn = {t: i for i, t in enumerate(turn_ids)}
    paid = 0.0
    for turn, penalty in (turn_penalties or {}).items():
        if penalty and turn in last_of_turn:
            rewards[last_of_turn[turn]] -= penalty
            paid += penalty
    rewards[-1] += episode_reward + paid
    return rewards


def gae(
    rewards: Sequence[float], values: Sequence[float], gamma: float = 1.0, lam: float = 1.0
) -> tuple[list[float], list[float]]:
    """Generalised advantage estimation over one episode's action tokens (module docstring, Eqs. 11 and 16).

    Returns ``(advantages, returns)`` with ``returns[i] = advantages[i] + values[i]``."""
    if len(rewards) != len(values):
        raise ValueError(f"{len(rewards)} rewards but {len(values)} values: one of each per action token.")
    n = len(rewards)
    advantages = [0.0] * n
    running, next_value = 0.0, 0.0  # V(s_n) = 0: the episode ends after its last action
    for i in range(n - 1, -1, -1):
        delta = rewards[i] + gamma * next_value - values[i]
        running = delta + gamma * lam * running
        advantages[i] = running
        next_value = values[i]
    return advantages, [a + v for a, v in zip(advantages, values)]


def episode_gae(
    env_masks: Sequence[Sequence[int]],
    turn_ids: Sequence[Sequence[int]],
    values: Sequence[Sequence[float]],
    episode_reward: float,
    turn_penalties: Mapping[int, float] | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[list[list[float]], list[list[float]]]:
    """GAE over one whole episode given as its training rows, in order (one row per turn, or one packed / full
    row): each row's completion `env_masks` (1 on action tokens), `turn_ids` and critic `values`, all aligned with the
    row's completion tokens. The action tokens of all rows form one sequence (environment and template tokens are
    skipped), rewarded by `action_token_rewards`; the advantages and returns are then split back into the rows.
    Returns ``(advantages, returns)``: one list per row, aligned with its completion, 0 off the action tokens."""
    tokens = [(r, i) for r, mask in enumerate(env_masks) for i, m in enumerate(mask) if m]
    advantages = [[0.0] * len(mask) for mask in env_masks]
    returns = [[0.0] * len(mask) for mask in env_masks]
    if not tokens:
        return advantages, returns
    rewards = action_token_rewards([turn_ids[r][i] for r, i in tokens], episode_reward, turn_penalties)
    token_advantages, token_returns = gae(rewards, [values[r][i] for r, i in tokens], gamma, lam)
    for (r, i), a, ret in zip(tokens, token_advantages, token_returns):
        advantages[r][i], returns[r][i] = a, ret
    return advantages, returns


def moments(sequences: Sequence[Sequence[float]]) -> torch.Tensor:
    """``[count, sum, sum of squares]`` of all values (float64), to be summed over processes before `whiten`."""
    count = sum(len(s) for s in sequences)
    total = sum(sum(s) for s in sequences)
    squares = sum(x * x for s in sequences for x in s)
    return torch.tensor([count, total, squares], dtype=torch.float64)


def mean_and_std(stats: torch.Tensor) -> tuple[float, float]:
    """Mean and unbiased standard deviation from `moments` (summed over processes)."""
    count, total, squares = (float(x) for x in stats)
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    variance = max(0.0, squares / count - mean * mean) * (count / (count - 1) if count > 1 else 0.0)
    return mean, math.sqrt(variance)


def whiten(values: Sequence[float], mean: float, std: float, eps: float = 1e-8) -> list[float]:
    """``(x - mean) / sqrt(std^2 + eps)``: advantages whitened over the whole batch (all processes' action tokens)."""
    scale = 1.0 / math.sqrt(std * std + eps)
    return [(x - mean) * scale for x in values]


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    weights: torch.Tensor,
    cliprange: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss, aggregated with per-token `weights` (zero off the counted tokens):

        V_clip = V_old + clip(V - V_old, -c, c)
        loss   = sum_i w_i * 1/2 * max((V_i - R_i)^2, (V_clip_i - R_i)^2)

    The max makes the clipped term a pessimistic bound: a value that moved more than `cliprange` away from the value
    the advantages were computed with gets no gradient pulling it further. `cliprange=None` gives the plain squared
    error. Returns ``(loss, clipped)``, ``clipped`` the weighted share of tokens where the clipped error is the larger
    one (the `critic/clipfrac` metric, detached)."""
    unclipped = (values - returns) ** 2
    if cliprange is None:
        return (0.5 * unclipped * weights).sum(), torch.zeros((), device=values.device)
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange, cliprange)
    clipped = (clipped_values - returns) ** 2
    loss = (0.5 * torch.maximum(unclipped, clipped) * weights).sum()
    share = ((clipped > unclipped).to(weights.dtype) * weights).sum().detach()
    return loss, share


def explained_variance_sums(returns: Sequence[float], values: Sequence[float]) -> torch.Tensor:
    """``[n, sum R, sum R^2, sum (R - V), sum (R - V)^2]`` (float64), to be summed over processes."""
    diffs = [r - v for r, v in zip(returns, values)]
    return torch.tensor(
        [len(returns), sum(returns), sum(r * r for r in returns), sum(diffs), sum(d * d for d in diffs)],
        dtype=torch.float64,
    )


def explained_variance(sums: torch.Tensor) -> float:
    """``1 - Var[R - V] / Var[R]`` from `explained_variance_sums`: 1 for a perfect critic, 0 for one that predicts the
    mean return, negative for worse. NaN when the returns do not vary (nothing to explain)."""
    n, sum_r, sum_r2, sum_d, sum_d2 = (float(x) for x in sums)
    if n < 1:
        return math.nan
    var_r = sum_r2 / n - (sum_r / n) ** 2
    var_d = sum_d2 / n - (sum_d / n) ** 2
    if var_r <= 1e-12:
        return math.nan
    return 1.0 - var_d / var_r
