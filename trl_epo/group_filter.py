"""Dynamic sampling (DAPO's `filter_groups`, verl-agent's "GiGPO dynamic"): a group of G episodes whose rewards all
agree teaches GRPO nothing (its advantages are 0), so such groups are dropped and the batch is refilled from further
rollouts of freshly drawn tasks, until it holds as many informative groups as one rollout has, or
`env_filter_max_rollouts` rollouts were played for the step (first included).

The rule when the cap is hit: train on the informative groups found (a smaller batch; `filter/cap_hit` = 1). When no
informative group was found at all, train on the first rollout unfiltered (`filter/no_informative` = 1): its GRPO
advantages are 0, so only the KL and EPO's entropy terms act (GiGPO's step advantages may not be 0). Informative groups
beyond the target are not used (as DAPO). Decisions are made on all processes' rewards, so every process plays the
same number of rollouts and keeps the same groups (a group may straddle processes: each keeps its own episodes).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class FilterStats:
    """One step's dynamic sampling (the `filter/*` metrics)."""

    rollouts: int = 0
    played_groups: int = 0
    dropped_groups: int = 0  # zero-variance groups played
    kept_groups: int = 0  # groups trained on
    unused_groups: int = 0  # informative groups beyond the target
    cap_hit: bool = False
    no_informative: bool = False

    def metrics(self) -> dict[str, float]:
        return {
            "filter/kept_groups": float(self.kept_groups),
            "filter/dropped_groups": float(self.dropped_groups),
            "filter/unused_groups": float(self.unused_groups),
            "filter/extra_rollouts": float(self.rollouts - 1),
            "filter/cap_hit": float(self.cap_hit),
            "filter/no_informative": float(self.no_informative),
        }


def informative_groups(rewards: torch.Tensor, num_generations: int) -> list[bool]:
    """Per group of `num_generations` consecutive episodes: at least two scorable rewards (NaN: excluded) that are
    not all equal."""
    grouped = rewards.float().view(-1, num_generations)
    keep = []
    for values in grouped:
        valid = values[~torch.isnan(values)]
        keep.append(bool(valid.numel() >= 2 and (valid != valid[0]).any()))
    return keep


def refill_task_rows(
    dataset, local_rows: int, num_generations: int, seed: str, process_index: int, num_processes: int
) -> list[dict]:
    """This process's task rows of a refill rollout: as many groups as one rollout has (`local_rows` per process),
    tasks drawn from `dataset` with their own RNG (seeded by `seed`, the same on every process: the training RNG stream
    is not touched), each repeated `num_generations` times, dealt to processes in TRL's order."""
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ValueError(
            "env_filter_groups draws refill tasks from train_dataset: give a map-style (indexable) dataset."
        )
    groups = -(-(local_rows * num_processes) // num_generations)
    rng = random.Random(seed)
    size = len(dataset)
    drawn = rng.sample(range(size), groups) if groups <= size else [rng.randrange(size) for _ in range(groups)]
    rows = [i for i in drawn for _ in range(num_generations)]
    first = process_index * local_rows
    return [dict(dataset[i]) for i in rows[first : first + local_rows]]


def filter_groups(
    play: Callable[[list[dict[str, Any]]], tuple[list[Any], torch.Tensor]],
    first_inputs: list[dict[str, Any]],
    refill: Callable[[int], list[dict[str, Any]]],
    num_generations: int,
    max_rollouts: int,
    process_index: int,
) -> tuple[list[Any], FilterStats]:
    """Play rollouts until the informative groups fill one rollout's worth (see the module docstring).

    `play(task_rows)` plays and scores one rollout of this process's task rows: it returns (this process's training
    rows, with `episode` = the local episode index and their advantages set; all processes' rewards in TRL's order).
    `refill(attempt)` gives the task rows of extra rollout `attempt` (1, 2, ...). Returns the rows to train on, each
    row's `episode` renumbered to be unique across the rollouts (rollout r's episodes after rollout r-1's), and the
    stats."""
    local = len(first_inputs)
    first = process_index * local
    stats = FilterStats()
    played: list[tuple[list[Any], list[bool]]] = []
    target = selected = 0
    inputs = first_inputs
    while True:
        rows, rewards = play(inputs)
        keep = informative_groups(rewards, num_generations)
        if stats.rollouts == 0:
            target = len(keep)
        stats.rollouts += 1
        stats.played_groups += len(keep)
        stats.dropped_groups += keep.count(False)
        chosen = []
        for informative in keep:
            chosen.append(informative and selected < target)
            selected += chosen[-1]
            stats.unused_groups += informative and not chosen[-1]
        played.append((rows, chosen))
        if selected >= target or stats.rollouts >= max_rollouts:
            break
        inputs = refill(stats.rollouts)
    stats.kept_groups = selected
    stats.cap_hit = selected < target
    if selected == 0:  # nothing informative: the first rollout, unfiltered
        stats.no_informative = True
        stats.kept_groups = target
        played = [(played[0][0], [True] * target)]
    out = []
    for r, (rows, chosen) in enumerate(played):
        for row in rows:
            if chosen[(first + row.episode) // num_generations]:
                row.episode += r * local
                out.append(row)
    return out, stats


def check_filter_settings(max_rollouts: int, check_setting: Callable) -> None:
    """`env_filter_max_rollouts` (TRL itself refuses groups of fewer than 2 episodes)."""
    check_setting(
        isinstance(max_rollouts, int) and max_rollouts >= 1,
        "env_filter_max_rollouts",
        max_rollouts,
        "it must be an integer >= 1 (rollouts per step, the first included)",
    )
