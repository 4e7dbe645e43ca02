"""GiGPO: group-in-group advantages of multi-turn episodes (Feng et al., "Group-in-Group Policy Optimization for LLM
Agent Training", arXiv 2505.10978). Pure functions on all processes' episodes; the trainer gathers, calls, and
broadcasts the per-turn results to its rows (`set_turn_advantages`). The paper's quantities, by its symbols:

within a group of G episodes that share a reset (the same task and seed),

* **episode relative advantage** A^E(tau_i): the GRPO advantage of each episode's outcome in its group, exactly what
  `trl_epo.rows.group_advantages` computes for GRPO (`scale_rewards`, `env_advantage_baseline`; "rows" weighs each
  episode by its turns, verl-agent's `compute_mean_std_cross_steps`);
* **anchor-state groups** G^S(s~): the turns of the group whose *current environment observation* (the anchor key,
  never the windowed prompt) is the same form one step group; a state visited twice in one episode puts both turns
  in it. Optional similarity anchors merge keys whose `difflib` ratio is at least a threshold, greedily against each
  group's first member (verl-agent's `similarity_thresh`);
* **discounted step return** R_t: ``R_t = sum_{k >= t} gamma^(k - t) r_k`` over the per-turn rewards of the episode
  (outcome on the last turn, invalid-answer penalties on their turns: `turn_rewards`);
* **step relative advantage** A^S(a_t): ``R_t - mean`` ("mean_norm", verl-agent's default) or
  ``(R_t - mean) / (std + eps)`` ("mean_std_norm", its ALFWorld 1.5B script) within the step group; a singleton step
  group gets 0;
* **group-in-group advantage**: ``A(a_t) = A^E(tau) + omega * A^S(a_t)``.

Episodes whose reward is NaN (an excluded env failure) get 0 on every turn and join no step group.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass


ADVANTAGE_ESTIMATORS = ("grpo", "gigpo")
STEP_NORMS = ("mean_norm", "mean_std_norm")
ANCHOR_SOURCES = ("env", "observation")
"""'env': the env's canonical key (`StepResult.info["anchor"]`) where it gives one, else its observation text;
'observation': always the raw observation text (verl-agent's anchors)."""
STEP_EPS = 1e-6


def turn_rewards(reward: float, invalid: Sequence[bool], penalty: float) -> list[float]:
    """Per-turn rewards of an episode whose (sparse) reward is `reward`: `-penalty` on each invalid turn, the rest
    (`reward` plus the penalties) on the last turn, so that they add up to `reward`."""
    if not invalid:
        return []
    rewards = [-penalty if bad else 0.0 for bad in invalid]
    rewards[-1] += reward + penalty * sum(invalid)
    return rewards


def step_returns(rewards: Sequence[float], gamma: float) -> list[float]:
    """R_t: the discounted return from each turn on, ``R_t = r_t + gamma * R_{t+1}``."""
    returns = [0.0] * len(rewards)
    following = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        following = rewards[t] + gamma * following
        returns[t] = following
    return returns


def anchor_groups(keys: Sequence[str], similarity: float | None = None) -> list[int]:
    """G^S: the step group of every key, numbered in order of first appearance. Identical keys share a group; with
    `similarity`, a key joins the first group whose first member has a `difflib` ratio >= `similarity` with it."""
    ids: list[int] = []
    exact: dict[str, int] = {}
    firsts: list[difflib.SequenceMatcher] = []  # one matcher per group, its first member analysed once (seq2)
    for key in keys:
        group = exact.get(key)
        if group is None and similarity is not None:
            group = next((g for g, first in enumerate(firsts) if _similar(first, key, similarity)), None)
        if group is None:
            group = len(firsts)
            firsts.append(difflib.SequenceMatcher(None, b=key, autojunk=False))
        exact.setdefault(key, group)
        ids.append(group)
    return ids


def _similar(first: difflib.SequenceMatcher, key: str, threshold: float) -> bool:
    first.set_seq1(key)
    # the cheap upper bounds first: most pairs are far apart
    return first.real_quick_ratio() >= threshold and first.quick_ratio() >= threshold and first.ratio() >= threshold


def step_advantages(returns: Sequence[float], groups: Sequence[int], norm: str) -> tuple[list[float], list[int]]:
    """A^S: each turn's return normalised within its step group; returns (advantages, size of each turn's group).
    Unbiased std, as verl-agent (`torch.std`)."""
    if norm not in STEP_NORMS:
        raise ValueError(f"Unknown GiGPO step normalisation {norm!r}; supported: {list(STEP_NORMS)}.")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    advantages = [0.0] * len(returns)
    sizes = [0] * len(returns)
    for turns in members.values():
        for i in turns:
            sizes[i] = len(turns)
        if len(turns) < 2:
            continue
        values = [returns[i] for i in turns]  # plain floats: thousands of small groups per step
        mean = sum(values) / len(values)
        scale = 1.0
        if norm == "mean_std_norm":
            scale = 1.0 / (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) + STEP_EPS)
        for i, value in zip(turns, values):
            advantages[i] = (value - mean) * scale
    return advantages, sizes


@dataclass
class GiGPOStats:
    """What a GiGPO batch looked like (the `gigpo/*` metrics)."""

    step_groups: int  # step groups over all episode groups (singletons included)
    turns: int  # turns in step groups (of scorable episodes)
    anchored_turns: int  # turns in a step group of size > 1
    step_adv_std: float  # std of the step advantages over those turns

    @property
    def anchor_coverage(self) -> float:
        return self.anchored_turns / max(1, self.turns)

    def metrics(self) -> dict[str, float]:
        return {
            "gigpo/step_groups": float(self.step_groups),
            "gigpo/anchor_coverage": self.anchor_coverage,
            "gigpo/step_adv_std": self.step_adv_std,
        }


def gigpo_advantages(
    episode_advantages: Sequence[float],
    rewards: Sequence[float],
    anchors: Sequence[Sequence[str]],
    invalid: Sequence[Sequence[bool]],
    num_generations: int,
    gamma: float = 0.95,
    step_weight: float = 1.0,
    step_norm: str = "mean_norm",
    similarity: float | None = None,
    invalid_penalty: float = 0.0,
) -> tuple[list[list[float]], GiGPOStats]:
    """A = A^E + omega * A^S: the advantage of every turn of N episodes (all processes', in TRL's order: groups of
    `num_generations` consecutive episodes). `episode_advantages[i]` is episode i's GRPO advantage, `rewards[i]` its
    reward (NaN: excluded), `anchors[i][t]` the anchor key of its turn t, `invalid[i][t]` whether that answer was
    invalid (penalised by `invalid_penalty` on that turn). Returns (per-episode lists of per-turn advantages,
    stats)."""
    n = len(rewards)
    if n % num_generations:
        raise ValueError(f"{n} episodes do not form groups of {num_generations}.")
    if not (len(episode_advantages) == len(anchors) == len(invalid) == n):
        raise ValueError("GiGPO needs one episode advantage, reward, anchor list and invalid list per episode.")
    result = [[0.0] * len(a) for a in anchors]
    step_groups = turns_total = anchored = 0
    all_steps: list[float] = []
    for start in range(0, n, num_generations):
        where: list[tuple[int, int]] = []
        keys: list[str] = []
        returns: list[float] = []
        for i in range(start, start + num_generations):
            if len(anchors[i]) != len(invalid[i]):
                raise ValueError(f"Episode {i}: {len(anchors[i])} anchors but {len(invalid[i])} turns.")
            reward = float(rewards[i])
            if reward != reward:  # NaN: an excluded env failure
                continue
            returns += step_returns(turn_rewards(reward, invalid[i], invalid_penalty), gamma)
            where += [(i, t) for t in range(len(anchors[i]))]
            keys += list(anchors[i])
        groups = anchor_groups(keys, similarity)
        steps, sizes = step_advantages(returns, groups, step_norm)
        step_groups += len(set(groups))
        turns_total += len(keys)
        anchored += sum(size > 1 for size in sizes)
        all_steps += steps
        for (i, t), step in zip(where, steps):
            result[i][t] = float(episode_advantages[i]) + step_weight * step
    spread = 0.0
    if len(all_steps) > 1:
        mean = sum(all_steps) / len(all_steps)
        spread = math.sqrt(sum((v - mean) ** 2 for v in all_steps) / (len(all_steps) - 1))
    return result, GiGPOStats(step_groups, turns_total, anchored, spread)


# --------------------------------------------------------------------------------------------------------------------
# The trainer's side: the turns of all processes' episodes in, per-token advantages on this process's rows out
# --------------------------------------------------------------------------------------------------------------------


def episode_turns(episodes, source: str) -> list[tuple[list[str], list[bool]]]:
    """(anchor keys, invalid answers) per turn of each episode (`Episode.anchor_keys`, `Episode.invalid_answers`)."""
    if source not in ANCHOR_SOURCES:
        raise ValueError(f"Unknown GiGPO anchor source {source!r}; supported: {list(ANCHOR_SOURCES)}.")
    return [(e.anchor_keys(source), e.invalid_answers) for e in episodes]


def set_turn_advantages(rows, per_turn: Sequence[Sequence[float]]) -> None:
    """Give each row its turns' advantages: `per_turn[row.episode][t]` on the action tokens of turn t (0 on the other
    tokens); a row of one turn (the "step" layout) gets it as a number, a row of several turns a list per token."""
    for row in rows:
        advantages = per_turn[row.episode]
        turns = {t for m, t in zip(row.env_mask, row.turn_ids) if m}
        if not turns:  # no action token (an episode that failed at reset)
            row.advantage = 0.0
        elif len(turns) == 1 and all(row.env_mask):
            row.advantage = advantages[next(iter(turns))]
        else:
            row.advantage = [advantages[t] if m else 0.0 for m, t in zip(row.env_mask, row.turn_ids)]


def check_gigpo_settings(args, check_setting) -> None:
    """EPOConfig's `env_advantage_estimator` / `env_gigpo_*` fields (validated once, in `EPOConfig.__post_init__`)."""
    check_setting(
        args.env_advantage_estimator in ADVANTAGE_ESTIMATORS,
        "env_advantage_estimator",
        args.env_advantage_estimator,
        f"use one of {ADVANTAGE_ESTIMATORS}",
    )
    check_setting(0 <= args.env_gigpo_gamma <= 1, "env_gigpo_gamma", args.env_gigpo_gamma, "it must be in [0, 1]")
    check_setting(
        args.env_gigpo_step_weight >= 0, "env_gigpo_step_weight", args.env_gigpo_step_weight, "it must be >= 0"
    )
    check_setting(
        args.env_gigpo_step_norm in STEP_NORMS, "env_gigpo_step_norm", args.env_gigpo_step_norm, f"use {STEP_NORMS}"
    )
    similarity = args.env_gigpo_similarity
    check_setting(
        similarity is None or 0 < similarity <= 1,
        "env_gigpo_similarity",
        similarity,
        "it must be in (0, 1] (a difflib ratio) or None (exact anchors)",
    )
    check_setting(
        args.env_gigpo_anchor in ANCHOR_SOURCES, "env_gigpo_anchor", args.env_gigpo_anchor, f"use {ANCHOR_SOURCES}"
    )


def assign_gigpo(
    rows, rewards, episode_advantages, turns, first: int, num_generations: int, args, penalty: float
) -> GiGPOStats:
    """GiGPO's per-turn advantages (EPOConfig `args`: `env_gigpo_*`; `penalty`: the rollout's invalid-answer penalty)
    of all processes' episodes (`turns`: `episode_turns` of every process, in TRL's order), set on this process's
    `rows` (its episodes start at global index `first`)."""
    per_turn, stats = gigpo_advantages(
        episode_advantages.tolist(),
        rewards.tolist(),
        [anchors for anchors, _ in turns],
        [invalid for _, invalid in turns],
        num_generations,
        args.env_gigpo_gamma,
        args.env_gigpo_step_weight,
        args.env_gigpo_step_norm,
        args.env_gigpo_similarity,
        penalty,
    )
    local = len({row.episode for row in rows})
    set_turn_advantages(rows, per_turn[first : first + local])
    return stats
