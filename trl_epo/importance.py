"""The vLLM-vs-trainer mismatch of env rollouts: the importance-sampling correction of the loss (per token, per turn
or per row) and the statistics of the per-token logprob gap by turn. Pure functions, no trainer.

Why per token by default (`EPOConfig.env_importance_sampling="token_truncate"`): the correction multiplies the loss
of an action token by pi_trainer / pi_vLLM. A sequence-level ratio (TRL's default, `sequence_mask`) is the product
of the token ratios of a whole row: for a multi-turn episode trained as one row (the `episode` / `packed` layouts)
that is up to ~15k action tokens over 30-50 turns, so a typical per-token mismatch of a few hundredths of a nat
(bf16 training kernels vs vLLM's) drives the product outside [clip_min, clip_max] and masks (or, truncated, crushes)
long episodes -- the ones the sparse reward is about. A truncated per-token ratio depends only on its own token:
neither episode length nor the number of turns can mask an episode, and its bias is bounded per token (the truncated
importance sampling of Yao et al., 2025, verl's default). Per-turn ratios (`turn_*`, the product over the tokens of
one sampling call) are offered between the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


IMPORTANCE_SAMPLING_MODES = (
    "token_truncate",
    "token_mask",
    "turn_truncate",
    "turn_mask",
    "sequence_truncate",
    "sequence_mask",
)
"""`<unit>_<constraint>`: the ratio of a token, of a turn (product over its tokens) or of a whole row (TRL's
`sequence_*`); `truncate` clips it to [clip_min, clip_max], `mask` zeroes it outside."""

MISMATCH_STATS = ("abs_gap", "gap", "tokens", "ratio", "zero_ratio")
"""The per-turn sums of `mismatch_sums` (rows of its result)."""


def importance_ratios(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor,
    turn_ids: torch.Tensor,
    mode: str,
    clip_min: float | None,
    clip_max: float | None,
) -> torch.Tensor:
    """The vLLM-vs-trainer importance-sampling correction of a chunk, per token ``(B, L)``: ``exp(old - sampling)``
    per token (``token_*``), per turn (``turn_*``: the product of the turn's token ratios, broadcast to its tokens)
    or per row (``sequence_*``, TRL's modes), clipped to [clip_min, clip_max] (``*_truncate``) or zeroed outside it
    (``*_mask``). Only tokens with ``mask`` 1 enter products; tokens whose sampling logprob is NaN count as ratio 1.
    """
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"Unknown importance-sampling mode {mode!r}; supported: {list(IMPORTANCE_SAMPLING_MODES)}.")
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    unit = mode.split("_")[0]
    if unit == "turn":
        slots = int(turn_ids.max().clamp(min=0).item()) + 1 if turn_ids.numel() else 1
        index = turn_ids.clamp(min=0)
        per_turn = torch.zeros(diff.size(0), slots, device=diff.device, dtype=diff.dtype)
        per_turn.scatter_add_(1, index, diff)
        diff = per_turn.gather(1, index)
    elif unit == "sequence":
        diff = diff.sum(dim=1, keepdim=True).expand_as(diff)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio if clip_min is None and clip_max is None else ratio.clamp(min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def mismatch_sums(
    rows: Sequence, turns: int, mode: str, clip_min: float | None, clip_max: float | None
) -> tuple[torch.Tensor, float]:
    """Sums over the action tokens vLLM scored, per turn ``(len(MISMATCH_STATS), turns)`` in float64 (add them over
    processes, then divide by ``tokens``), and the largest absolute gap. The gap is trainer minus vLLM logprob
    (`old_logps - logprobs` of each `TrainingRow`); ``ratio`` / ``zero_ratio`` are the correction of `mode` and how
    many tokens it zeroes. Turns past ``turns - 1`` count in the last slot."""
    sums = torch.zeros(len(MISMATCH_STATS), turns, dtype=torch.float64)
    largest = 0.0
    for row in rows:
        if row.old_logps is None or row.logprobs is None or not row.completion_ids:
            continue
        old = torch.tensor(row.old_logps, dtype=torch.float64).unsqueeze(0)
        sampled = torch.tensor(row.logprobs, dtype=torch.float64).unsqueeze(0)
        mask = torch.tensor(row.env_mask, dtype=torch.float64).unsqueeze(0)
        turn_ids = torch.tensor(row.turn_ids, dtype=torch.long).unsqueeze(0)
        ratio = importance_ratios(old, sampled, mask, turn_ids, mode, clip_min, clip_max)[0]
        scored = (mask[0] > 0) & torch.isfinite(sampled[0])
        if not scored.any():
            continue
        gap = (old - sampled)[0][scored]
        slot = turn_ids[0][scored].clamp(0, turns - 1)
        values = [gap.abs(), gap, torch.ones_like(gap), ratio[scored], (ratio[scored] == 0).double()]
        for i, value in enumerate(values):
            sums[i].scatter_add_(0, slot, value)
        largest = max(largest, float(gap.abs().max()))
    return sums, largest


def mismatch_metrics(sums: torch.Tensor, largest: float) -> dict[str, float]:
    """`vllm/*` metrics of `mismatch_sums` added over processes: the mean absolute per-token logprob gap (overall and
    per turn), the mean signed gap, the largest gap, the mean correction ratio and the fraction of tokens it zeroes."""
    stats = dict(zip(MISMATCH_STATS, sums))
    tokens = float(stats["tokens"].sum())
    if tokens == 0:
        return {}
    metrics = {
        "vllm/logprob_gap/mean": float(stats["abs_gap"].sum()) / tokens,
        "vllm/logprob_gap/signed_mean": float(stats["gap"].sum()) / tokens,
        "vllm/logprob_gap/max": largest,
        "vllm/is_ratio/mean": float(stats["ratio"].sum()) / tokens,
        "vllm/is_ratio/zero_frac": float(stats["zero_ratio"].sum()) / tokens,
    }
    for turn, (gap, count) in enumerate(zip(stats["abs_gap"].tolist(), stats["tokens"].tolist())):
        if count > 0:
            metrics[f"vllm/logprob_gap/turn/{turn}"] = gap / count
    return metrics
