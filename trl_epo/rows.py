"""Played episodes -> training rows -> the optimizer steps that consume them (pure functions, no trainer).

Layouts (`EPOConfig.env_sample_layout`):

* ``"step"`` (default with windowed prompts): one row per turn, prompt = exactly the ids the model saw that turn,
  completion = that turn's answer. Memory is set by the longest turn, attention work is linear in the turns.
* ``"packed"``: one row per episode with every turn's block packed in it (positions and attention restart per
  block, `trl_epo.packing`).
* ``"episode"`` (full-context conversations, `env_history_turns=None`): one row per episode, the whole conversation.

Advantages are computed per episode (`group_advantages`: GRPO's groups of G episodes of a task) and broadcast to the
episode's rows. A rollout's rows are consumed in K optimizer steps (`schedule_rows`): whole episodes are dealt to
steps at random (Eq. 2 aggregates per episode, so an episode's rows stay in one step), rows to the step's
micro-batches, and each micro-batch is cut into forward chunks under a token budget. Every row is used exactly once,
and every step is normalised with the rollout's counts / K (`rollout_step_counts`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


LAYOUTS = ("step", "packed", "episode")
ADVANTAGE_BASELINES = ("episode", "rows")
"""'episode': GRPO's baseline over the G episodes of a group (the paper's formula); 'rows': verl-agent's baseline over
all turn rows of the group (the paper's code, `compute_mean_std_cross_all_data`): an episode weighs by its turns."""


@dataclass
class TrainingRow:
    """One training sequence: `prompt_ids` then `completion_ids`, whose `env_mask` is 1 on the model's own tokens."""

    prompt_ids: list[int]
    completion_ids: list[int]
    env_mask: list[int]
    turn_ids: list[int]
    episode: int  # index of the row's episode in the rollout (this process)
    logprobs: list[float] | None = None  # sampling logprobs (vLLM), aligned with completion_ids
    advantage: float | list[float] = 0.0  # the episode's (GRPO), or one per completion token (a critic's GAE)
    epo_weights: list[float] | None = None  # EPO aggregation weights per completion token (set by schedule_rows)
    old_logps: list[float] | None = None  # the policy's logprobs before this rollout's updates (K > 1)
    ref_logps: list[float] | None = None  # the reference model's logprobs (KL)
    extra: dict = field(default_factory=dict)  # per-row values other modules attach (e.g. PPO's returns)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def action_tokens(self) -> int:
        return sum(self.env_mask)


def resolve_layout(layout: str | None, windowed: bool) -> str:
    """The layout to use: `layout`, or the default ("step" with windowed prompts, else "episode")."""
    if layout is None:
        return "step" if windowed else "episode"
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown sample layout {layout!r}; supported: {list(LAYOUTS)}.")
    if not windowed and layout != "episode":
        raise ValueError(
            f"env_sample_layout={layout!r} needs windowed prompts (env_history_turns=k): a full-context conversation "
            "is one growing sequence, trained as one row per episode (env_sample_layout='episode' or None)."
        )
    if windowed and layout == "episode":
        raise ValueError("Windowed prompts are trained per turn ('step') or packed per episode ('packed').")
    return layout


def episode_rows(
    index: int,
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    env_mask: Sequence[int],
    turn_ids: Sequence[int],
    logprobs: Sequence[float] | None,
    layout: str,
) -> list[TrainingRow]:
    """The training rows of one episode. "step" cuts the completion at every turn: turn t's row is its block's prompt
    (the environment ids before its answer; the episode's first prompt for turn 0) and its answer."""
    if layout != "step":
        return [
            TrainingRow(
                list(prompt_ids),
                list(completion_ids),
                list(env_mask),
                list(turn_ids),
                index,
                list(logprobs) if logprobs is not None else None,
            )
        ]
    rows: list[TrainingRow] = []
    context: list[int] = list(prompt_ids)
    answer: list[int] = []
    answer_lps: list[float] = []
    turn = None
    for position, (token, mask, t) in enumerate(zip(completion_ids, env_mask, turn_ids)):
        if mask:
            answer.append(token)
            answer_lps.append(logprobs[position] if logprobs is not None else 0.0)
            turn = t
            continue
        if answer:  # the answer of this turn is complete: an environment token starts the next block
            rows.append(_step_row(context, answer, answer_lps, turn, index, logprobs is not None))
            context, answer, answer_lps = [], [], []
        context.append(token)
    if answer:
        rows.append(_step_row(context, answer, answer_lps, turn, index, logprobs is not None))
    if not rows:  # no answer at all (the env failed at reset): one row without action tokens keeps it well-formed
        rows.append(
            TrainingRow(list(prompt_ids), list(completion_ids), [0] * len(completion_ids), list(turn_ids), index, None)
        )
    return rows


def _step_row(context, answer, logprobs, turn, index, has_logprobs) -> TrainingRow:
    return TrainingRow(
        list(context),
        list(answer),
        [1] * len(answer),
        [turn] * len(answer),
        index,
        list(logprobs) if has_logprobs else None,
    )


# --------------------------------------------------------------------------------------------------------------------
# Advantages: per episode, broadcast to its rows
# --------------------------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    baseline: str = "episode",
    rows_per_episode: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantages of N episodes in groups of `num_generations` consecutive episodes (all processes' episodes, in
    TRL's order). NaN rewards (excluded env failures) are left out of the baselines and get advantage 0.

    * ``baseline="episode"``: TRL's GRPO, ``A = (R - mean_g) / (std_g + 1e-4)`` over the G episodes of the group
      (`scale_rewards` "group", "batch" or "none", as TRL); unbiased std.
    * ``baseline="rows"``: verl-agent's GRPO on turn rows (the paper's code): mean and std over all turn rows of the
      group, i.e. each episode weighted by its number of rows, ``A = (R - mean) / (std + 1e-6)`` (unbiased std over
      rows; `scale_rewards="none"` keeps only the mean).
    """
    if baseline not in ADVANTAGE_BASELINES:
        raise ValueError(f"Unknown advantage baseline {baseline!r}; supported: {list(ADVANTAGE_BASELINES)}.")
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {num_generations}.")
    # float64, and rewards taken relative to one valid member of their group (of the batch with "batch"): the same
    # advantages, but a group of equal rewards gives exactly 0 (a rounded weighted mean divided by std + eps, which is
    # then ~1e-8, would give up to +-0.06).
    grouped = rewards.double().view(-1, num_generations)
    valid = ~torch.isnan(grouped)
    first = torch.where(valid.any(1), valid.float().argmax(1), 0)
    if scale_rewards == "batch":
        anchor = grouped[valid][0] if valid.any() else grouped.new_zeros(())
    else:
        anchor = grouped.gather(1, first.unsqueeze(1))
    grouped = grouped - anchor
    if baseline == "episode":
        weights = valid.double()
        eps = 1e-4
    else:
        if rows_per_episode is None:
            raise ValueError("The 'rows' baseline needs the number of rows of each episode.")
        weights = rows_per_episode.double().view(-1, num_generations) * valid
        eps = 1e-6
    values = torch.nan_to_num(grouped, nan=0.0)
    if scale_rewards == "batch":
        total = weights.sum().clamp(min=1e-12)
        mean = (weights * values).sum() / total
        std = _weighted_std(values, weights, mean, dims=None)
        mean, std = mean.expand_as(values), std.expand_as(values)
    else:
        total = weights.sum(1, keepdim=True).clamp(min=1e-12)
        mean = ((weights * values).sum(1, keepdim=True) / total).expand_as(values)
        std = _weighted_std(values, weights, mean, dims=1).expand_as(values)
    advantages = values - mean
    if scale_rewards != "none":
        advantages = advantages / (std + eps)
    return torch.where(valid, advantages, torch.zeros_like(advantages)).view(-1).float()


def _weighted_std(values, weights, mean, dims) -> torch.Tensor:
    """Unbiased weighted std (integer weights = repeated samples): sqrt(sum w (x - m)^2 / (sum w - 1))."""
    keep = dims is not None
    total = weights.sum(dims, keepdim=keep) if keep else weights.sum()
    squares = (
        (weights * (values - mean) ** 2).sum(dims, keepdim=keep) if keep else (weights * (values - mean) ** 2).sum()
    )
    return torch.sqrt(squares / (total - 1).clamp(min=1e-12)) * (total > 1)


# --------------------------------------------------------------------------------------------------------------------
# The optimizer steps of a rollout
# --------------------------------------------------------------------------------------------------------------------


def balanced_bins(sizes: Sequence[int], num_bins: int, order: Sequence[int] | None = None) -> list[int]:
    """Assign items to `num_bins` bins so that the largest bin total is small: each item, in `order`, goes to the
    bin with the smallest total so far (ties: fewer items, then the lower bin). The default order is longest first
    (longest processing time: the tightest bins, deterministic). Returns the bin of every item."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
    totals = [0] * num_bins
    counts = [0] * num_bins
    assignment = [0] * len(sizes)
    if order is None:
        order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    for item in order:
        target = min(range(num_bins), key=lambda b: (totals[b], counts[b], b))
        assignment[item] = target
        totals[target] += sizes[item]
        counts[target] += 1
    return assignment


def token_chunks(lengths: Sequence[int], budget: int | None, max_padding: float = 0.1) -> list[list[int]]:
    """Cut rows into forward chunks of at most `budget` tokens counted with padding (rows x the longest row): rows
    sorted by length, a new chunk when the next row would break the budget or push the chunk's padding above
    `max_padding`. A row longer than the budget gets its own chunk. No budget: only the padding bound."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    chunks: list[list[int]] = []
    for i in order:
        if chunks:
            current = chunks[-1]
            width = lengths[current[0]]  # the longest: rows come longest first
            padded = width * (len(current) + 1)
            real = sum(lengths[j] for j in current) + lengths[i]
            if (budget is None or padded <= budget) and 1 - real / padded <= max_padding:
                current.append(i)
                continue
        chunks.append([i])
    return chunks


@dataclass
class StepCounts:
    """Global (all processes) counts of one optimizer step: the normalisers of its losses."""

    rows: float
    action_tokens: float
    trajectories: float  # episodes with at least one action token (Eq. 2's B)


def schedule_rows(
    rows: Sequence[TrainingRow], num_steps: int, micro_steps: int, seed: int | None = None
) -> tuple[list[list[list[TrainingRow]]], torch.Tensor]:
    """Split a rollout's rows into `num_steps` optimizer steps of `micro_steps` micro-batches each.

    Whole episodes go to steps (Eq. 2 aggregates per episode), dealt in a random order (`seed`) each to the step with
    the fewest tokens so far; with K steps and K episodes that is one episode per step, at random, as the paper's
    code deals its mini-batches. (Longest first, `seed=None`, would give every step episodes of one length, and the
    first update of every rollout the longest episodes: the failures that ran to the turn limit.) Rows go to the
    step's micro-batches balanced by tokens. Returns ``(steps, local_counts)``: ``steps[k][m]`` is a list of rows
    (possibly empty), and ``local_counts`` a ``(num_steps, 3)`` tensor of this process's (rows, action tokens,
    trajectories) per step; summed over processes, `rollout_step_counts` turns them into the steps' normalisers."""
    episodes: dict[int, list[TrainingRow]] = {}
    for row in rows:
        episodes.setdefault(row.episode, []).append(row)
    keys = sorted(episodes)
    order = None
    if seed is not None:
        order = list(range(len(keys)))
        random.Random(seed).shuffle(order)
    step_of = balanced_bins([sum(r.length for r in episodes[e]) for e in keys], num_steps, order)
    steps: list[list[list[TrainingRow]]] = [[[] for _ in range(micro_steps)] for _ in range(num_steps)]
    counts = torch.zeros(num_steps, 3, dtype=torch.float64)
    for k in range(num_steps):
        members = [r for e, s in zip(keys, step_of) if s == k for r in episodes[e]]
        for row, m in zip(members, balanced_bins([r.length for r in members], micro_steps)):
            steps[k][m].append(row)
        counts[k, 0] = len(members)
        counts[k, 1] = sum(r.action_tokens for r in members)
        counts[k, 2] = sum(1 for e, s in zip(keys, step_of) if s == k and any(r.action_tokens for r in episodes[e]))
    return steps, counts


def rollout_step_counts(counts: torch.Tensor) -> list[StepCounts]:
    """The normalisers of a rollout's K optimizer steps from their global ``(K, 3)`` counts: every step gets the
    rollout's totals divided by K. So a token weighs K/N in whichever step it lands (per-token losses), an episode K/B
    (Eq. 2) and a row K/R (per-row losses), as they weigh 1/N, 1/B and 1/R with K = 1: an episode's weight in the
    rollout's update does not depend on the lengths of the episodes it shares a step with. (Each step normalised by
    its own counts makes a short episode's tokens weigh N_long/N_short times a long one's when steps are
    length-homogeneous.) A step's total weight is its share of the rollout times K, about 1 when steps are balanced."""
    k = counts.size(0)
    totals = (counts.sum(0) / k).tolist()
    return [StepCounts(*totals) for _ in range(k)]


def set_epo_weights(rows: Sequence[TrainingRow], counts: StepCounts, aggregation: str) -> None:
    """Per-token EPO aggregation weights with the step's global normalisers: Eq. 2 (``1 / (B * T_j * |tau_jt|)``,
    trajectories = episodes across their rows) or a token mean (``1 / N``). Over all processes' rows of the step the
    weights sum to 1."""
    if aggregation == "token":
        for row in rows:
            row.epo_weights = [m / max(1.0, counts.action_tokens) for m in row.env_mask]
        return
    if aggregation != "trajectory":
        raise ValueError(f"Unknown entropy aggregation {aggregation!r}; supported: ['trajectory', 'token'].")
    per_turn: dict[tuple[int, int], int] = {}
    for row in rows:
        for m, t in zip(row.env_mask, row.turn_ids):
            if m:
                per_turn[(row.episode, t)] = per_turn.get((row.episode, t), 0) + 1
    turns: dict[int, int] = {}
    for episode, _ in per_turn:
        turns[episode] = turns.get(episode, 0) + 1
    b = max(1.0, counts.trajectories)
    for row in rows:
        row.epo_weights = [
            m / (per_turn[(row.episode, t)] * turns[row.episode] * b) if m else 0.0
            for m, t in zip(row.env_mask, row.turn_ids)
        ]


def padding_fraction(chunks: Sequence[Sequence[TrainingRow]]) -> float:
    """Padding tokens / all tokens of forward chunks, padded as `collate` pads them (each row's whole sequence to
    the chunk's longest)."""
    padded = real = 0
    for chunk in chunks:
        if chunk:
            padded += len(chunk) * max(r.length for r in chunk)
            real += sum(r.length for r in chunk)
    return 1.0 - real / padded if padded else 0.0


def attention_flops(rows: Sequence[TrainingRow], hidden: int, layers: int) -> float:
    """Forward attention FLOPs (QK^T and AV: 4 * L^2 * d per layer) of rows, each attending over its whole length
    (a packed row without a block-diagonal kernel does)."""
    return float(sum(4 * r.length**2 * hidden * layers for r in rows))


def dense_mask_bytes(batch: int, length: int, bytes_per_element: int) -> float:
    """Bytes of the B x 1 x L x L attention mask transformers builds for packed rows without flash attention."""
    return float(batch) * length * length * bytes_per_element


# --------------------------------------------------------------------------------------------------------------------
# A forward chunk as TRL's loss inputs
# --------------------------------------------------------------------------------------------------------------------


def filler_row(pad_token_id: int) -> TrainingRow:
    """A one-token row without action tokens: its loss is 0, but its forward and backward keep the processes'
    collectives in step (ZeRO-3 gathers parameters in every forward)."""
    return TrainingRow(
        [pad_token_id],
        [pad_token_id],
        [0],
        [0],
        episode=-1,
        advantage=0.0,
        epo_weights=[0.0],
        old_logps=[0.0],
        ref_logps=[0.0],
    )


def collate(rows: Sequence[TrainingRow], pad_token_id: int, device=None) -> dict[str, torch.Tensor]:
    """TRL's loss inputs for a chunk of rows, padded tightly: each row's whole sequence (prompt + completion) is
    left-padded to the chunk's longest, so a chunk's padding is only the difference between the rows' total lengths
    (rows of similar length share a chunk). The completion region is the last C columns (C = the longest completion):
    a row with a shorter completion has its prompt's tail there, attended (`completion_mask` 1) but never trained
    (`tool_mask` 0). Per-token values (turn ids, EPO weights, per-token advantages, old / reference / sampling
    logprobs) are aligned with the region; a row's completion tokens are its last ``len(row.completion_ids)``
    columns."""
    width = max(r.length for r in rows)
    region = max(len(r.completion_ids) for r in rows)

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    def aligned(per_row, fill, dtype=torch.float32):  # per-completion-token values placed in the region
        return tensor([[fill] * (region - len(v)) + list(v) for v in per_row], dtype)

    sequences = [[pad_token_id] * (width - r.length) + r.prompt_ids + r.completion_ids for r in rows]
    masks = [[0] * (width - r.length) + [1] * r.length for r in rows]
    cut = width - region
    batch = {
        "prompt_ids": tensor([s[:cut] for s in sequences], torch.long),
        "prompt_mask": tensor([m[:cut] for m in masks], torch.long),
        "completion_ids": tensor([s[cut:] for s in sequences], torch.long),
        "completion_mask": tensor([m[cut:] for m in masks], torch.long),
        "tool_mask": aligned([r.env_mask for r in rows], 0, torch.long),
        "turn_ids": aligned([r.turn_ids for r in rows], -1, torch.long),
    }
    if all(isinstance(r.advantage, (int, float)) for r in rows):
        batch["advantages"] = tensor([float(r.advantage) for r in rows], torch.float32)
    else:  # per-token advantages (B, C); TRL's loss takes both shapes
        batch["advantages"] = aligned(
            [
                r.advantage if isinstance(r.advantage, list) else [float(r.advantage)] * len(r.completion_ids)
                for r in rows
            ],
            0.0,
        )
    optional = {
        "epo_weights": "epo_weights",
        "old_per_token_logps": "old_logps",
        "ref_per_token_logps": "ref_logps",
        "sampling_per_token_logps": "logprobs",
    }
    for key, attribute in optional.items():
        values = [getattr(r, attribute) for r in rows]
        if key == "sampling_per_token_logps" and any(v is not None for v in values):
            # Per row: a row without sampling logprobs (an episode that failed at reset: no action token; a filler
            # row) counts as sampled by the trainer's policy (ratio 1); the other rows of its chunk keep theirs.
            values = [v if v is not None else r.old_logps for v, r in zip(values, rows)]
        if all(v is not None for v in values):
            batch[key] = aligned(values, 0.0)
    return batch
