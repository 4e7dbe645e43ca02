"""EPO on TRL's own batch: `tools=`, `environment_factory=`, a custom `rollout_func`, or a plain prompt dataset.

TRL gives one padded row per episode and, on its agent paths, a `tool_mask` (TRL's tool loop; a `rollout_func`'s
`env_mask` becomes the same key): 1 on the model's tokens, 0 on tool results / environment tokens. It gives no turn
ids and normalises every loss per micro-batch. This module supplies what Eq. 2 needs from that batch:

* **Turn ids** (`turn_ids_from_mask`): each maximal run of model tokens (mask 1) is one turn. On TRL's tool loop
  that is one generation call: one assistant message, up to and including its end-of-turn token. An assistant
  message that holds several tool calls is ONE turn (the model wrote all of them in one sampling call; their results
  come back together as one tool block, which is the environment's part). A `rollout_func` that returns `turn_ids`
  next to `env_mask` keeps its own.
* **Global normalisers** (`step_normalisers`): Eq. 2's B (trajectories with an action token) and the token count of
  the "token" aggregation, over all micro-batches of the optimizer step and all processes, so that cutting a step
  into micro-batches (gradient accumulation) or processes changes nothing (`epo_num_trajectories` /
  `epo_num_tokens` on each micro-batch).

Pure functions here; `TRLBatchMixin` wires them into TRL's hooks (`_generate_and_score_completions`,
`_prepare_inputs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .importance import importance_ratios


TURN_IDS_KEY = "turn_ids"
"""Per-token turn index of each completion, as a list per rollout (returned by a `rollout_func` next to `env_mask`);
padded with -1 and passed to the loss as ``inputs["turn_ids"]``. Without it the turns are derived from the mask."""
NUM_TRAJECTORIES_KEY = "epo_num_trajectories"  # Eq. 2's B of the micro-batch's optimizer step (all processes)
NUM_TOKENS_KEY = "epo_num_tokens"  # action tokens of the micro-batch's optimizer step (all processes)


def turn_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Turn index of every token of ``mask`` ``(B, L)`` (1 = model token): each maximal run of 1s is one turn,
    numbered 0, 1, ... per row; -1 where the mask is 0 (environment, tool-result, padding tokens).

    >>> turn_ids_from_mask(torch.tensor([[1, 1, 0, 0, 1, 0, 1, 1]]))
    tensor([[ 0,  0, -1, -1,  1, -1,  2,  2]])
    """
    model = mask.detach() > 0
    previous = torch.zeros_like(model)
    previous[:, 1:] = model[:, :-1]
    starts = model & ~previous
    turns = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(model, turns, torch.full_like(turns, -1))


def padded_turn_ids(rows: Sequence[Sequence[int]], width: int, device) -> torch.Tensor:
    """A `rollout_func`'s per-token turn ids (a list per completion), cut or padded with -1 to ``width``."""
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, ids in enumerate(rows):
        ids = torch.as_tensor(list(ids)[:width], dtype=torch.long)
        out[i, : ids.numel()] = ids
    return out.to(device)


def loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    """TRL's loss mask of a batch: the completion mask, times the tool / env mask where there is one."""
    mask = batch["completion_mask"]
    return mask * batch["tool_mask"] if "tool_mask" in batch else mask


def micro_batch_counts(batch: dict[str, Any]) -> torch.Tensor:
    """``[trajectories with an action token, action tokens]`` of one micro-batch (one row = one trajectory)."""
    mask = loss_mask(batch)
    return torch.stack([(mask.sum(1) > 0).sum(), mask.sum()]).float()


def step_window(position: int, accumulation: int, generation_start: int, generation_end: int) -> range:
    """The micro-step positions of the optimizer step that micro-step `position` belongs to (steps of
    `accumulation` micro-steps), cut to the generation batch served from `generation_start` to `generation_end`
    (exclusive). With `steps_per_generation` a multiple of `accumulation` the whole step is inside one batch."""
    start = (position // accumulation) * accumulation
    return range(max(start, generation_start), min(start + accumulation, generation_end))


def step_normalisers(
    micro_counts: torch.Tensor, position: int, accumulation: int, generation_start: int, generation_end: int
) -> torch.Tensor:
    """``[B, N]`` for the micro-step at `position`: trajectories with an action token and action tokens of its
    optimizer step, from `micro_counts` ``(steps_per_generation, 2)`` (every buffered micro-batch's counts, summed
    over processes; micro-step q trains buffered micro-batch q % steps_per_generation, as TRL serves them).

    A step that straddles two generation batches (steps_per_generation not a multiple of gradient accumulation) is
    normalised per part: each part by its own counts, divided by its share of the step's micro-batches, so every
    part weighs as many micro-batches as it has (the later batch is not generated yet when the first part trains).
    """
    window = step_window(position, accumulation, generation_start, generation_end)
    index = torch.tensor([q % micro_counts.size(0) for q in window], device=micro_counts.device)
    share = len(window) / accumulation
    return micro_counts[index].sum(0) / share


def multi_turn_importance_ratio(batch: dict[str, Any], args) -> torch.Tensor:
    """The vLLM importance-sampling correction of a multi-turn TRL batch (one with a tool / env mask) in the
    `env_importance_sampling` mode, which replaces TRL's `vllm_importance_sampling_mode` there: TRL's default
    (`sequence_mask`) multiplies the token ratios of a whole episode and masks long multi-turn rows."""
    mask = loss_mask(batch)
    return importance_ratios(
        batch["old_per_token_logps"],
        batch["sampling_per_token_logps"],
        mask,
        batch[TURN_IDS_KEY] if TURN_IDS_KEY in batch else turn_ids_from_mask(mask),
        args.env_importance_sampling,
        args.vllm_importance_sampling_clip_min,
        args.vllm_importance_sampling_clip_max,
    )


class TRLBatchMixin:
    """Turn ids, global Eq. 2 normalisers and the multi-turn importance-sampling mode on TRL's own batch (every path
    but `env_factory=`, whose rows are trained by `trl_epo.row_training`). A mixin of `EPOTrainer` only."""

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        width = output["completion_ids"].size(1)
        if inputs and TURN_IDS_KEY in inputs[0]:  # a rollout_func's own turn ids (TRL merged them into the rows)
            output[TURN_IDS_KEY] = padded_turn_ids(
                [row[TURN_IDS_KEY] for row in inputs], width, output["completion_ids"].device
            )
        elif "tool_mask" in output:  # TRL's tool loop / a rollout_func's env_mask: one turn per run of model tokens
            output[TURN_IDS_KEY] = turn_ids_from_mask(loss_mask(output))
        if "tool_mask" in output and "importance_sampling_ratio" in output and "old_per_token_logps" in output:
            output["importance_sampling_ratio"] = multi_turn_importance_ratio(output, self.args)
        return output

    def _prepare_inputs(self, generation_batch):
        buffered = getattr(self, "_buffered_inputs", None)
        inputs = super()._prepare_inputs(generation_batch)
        if not self.model.training:
            return inputs
        if self._buffered_inputs is not buffered:  # a new generation batch: its micro-batches' counts, all processes
            counts = torch.stack([micro_batch_counts(b) for b in self._buffered_inputs])
            self._epo_micro_counts = self.accelerator.reduce(counts, reduction="sum")
            self._epo_generation_start = self._step
        generate_every = self.args.steps_per_generation * self.num_iterations
        counts = step_normalisers(
            self._epo_micro_counts,
            self._step,
            self.args.gradient_accumulation_steps,
            self._epo_generation_start,
            (self._step // generate_every + 1) * generate_every,
        )
        return {**inputs, NUM_TRAJECTORIES_KEY: counts[0], NUM_TOKENS_KEY: counts[1]}
