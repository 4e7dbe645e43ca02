"""TRL's loss options on env rows: each is a function of the optimizer step, never of how the step is cut into
forward chunks (`env_forward_token_budget`), or it is refused up front with the reason.

A step's rows are trained in chunks, each a call of TRL's `_compute_loss`, whose result `row_training` rescales with
`row_loss_scale` (TRL's per-micro-batch normalisation of the policy term -> the step's global one). What TRL adds to
its policy term, and how it is handled here:

* the entropy bonus (`entropy_coef`, static or `use_adaptive_entropy`): TRL adds ``-coef * token mean of the
  micro-batch / GA``; `row_loss` takes that out before the rescaling and adds ``-coef * token mean of the step``
  (all its chunks, micro-batches and processes). TRL's adaptive controller is unchanged: it sums the entropies of
  every chunk and updates the coefficient once, after the step's last chunk.
* the KL term, the clipping, `delta`, `importance_sampling_level`, the off-policy mask, the vLLM importance ratios:
  per token or per row, so chunking cannot change them.
* refused (`check_row_options`): `top_entropy_quantile < 1` (a quantile over the tokens of one forward call),
  `multi_objective_aggregation="normalize_then_sum"` and `mask_truncated_completions=True` (TRL applies them to its
  own generation batch, which env rows bypass), and a MoE router loss (a load-balancing loss over one forward's
  tokens: not a sum over tokens, so it cannot be split into chunks).
"""

from __future__ import annotations

import torch


def check_row_options(trainer) -> None:
    """Raise a ValueError listing every TRL option of `trainer` that env rows cannot apply per optimizer step."""
    args = trainer.args
    problems = []
    if args.top_entropy_quantile < 1.0:
        problems.append(
            f"top_entropy_quantile={args.top_entropy_quantile}: TRL takes the entropy quantile over the tokens of one "
            "forward pass, which on env rows is one chunk of env_forward_token_budget tokens, so the gradient would "
            "depend on the budget. Set top_entropy_quantile=1.0."
        )
    if args.multi_objective_aggregation != "sum_then_normalize":
        problems.append(
            f"multi_objective_aggregation={args.multi_objective_aggregation!r}: env rows compute advantages per "
            "episode from the weighted sum of the reward functions (env_advantage_baseline), TRL's "
            "'sum_then_normalize'. Set multi_objective_aggregation='sum_then_normalize'."
        )
    if args.mask_truncated_completions:
        problems.append(
            "mask_truncated_completions=True: an env episode is many answers; how it ended (max_turns, token_budget, "
            "context_limit) is an episode outcome the env reward already scores, and TRL's per-completion EOS test "
            "does not apply to its rows. Set mask_truncated_completions=False."
        )
    if getattr(trainer, "aux_loss_enabled", False):
        problems.append(
            f"the MoE router loss (router_aux_loss_coef={trainer.router_aux_loss_coef}): its load-balancing loss is "
            "computed over the tokens of one forward pass, so on env rows it would depend on env_forward_token_budget. "
            "Set router_aux_loss_coef=0 (or the model's output_router_logits=False)."
        )
    if problems:
        raise ValueError(
            "These TRL settings cannot be applied per optimizer step on environment rows (EPOTrainer with an "
            "env_factory):\n- " + "\n- ".join(problems)
        )


def applied_entropy_coef(trainer) -> float:
    """The coefficient TRL's entropy bonus applies in the current step (read it before TRL's `_compute_loss`: the
    adaptive controller updates it after the step's last chunk)."""
    if not getattr(trainer, "_entropy_bonus_enabled", False):
        return 0.0
    if trainer.use_adaptive_entropy:
        return trainer.entropy_coef if trainer._last_world_entropy <= trainer.args.entropy_target else 0.0
    return float(trainer.entropy_coef)


def row_loss(
    trl_loss: torch.Tensor,
    scale: float,
    entropy_coef: float,
    entropies: torch.Tensor,
    mask: torch.Tensor,
    step_action_tokens: float,
    accumulation: int,
    processes: int,
) -> torch.Tensor:
    """A chunk's share of its optimizer step's loss from TRL's loss of the chunk: the policy term times `scale`, and
    TRL's entropy bonus (``-coef * sum(H * mask) / sum(mask) / accumulation``, per micro-batch) replaced by the
    step's token mean ``-coef * sum(H * mask) / step_action_tokens``, times `processes` (data parallelism averages
    the gradients). Summed over the step's chunks on all processes: TRL's objective ``L_policy - coef * H_step``."""
    if not entropy_coef:
        return trl_loss * scale
    masked = (entropies * mask).sum()
    trl_bonus = masked / mask.sum().clamp(min=1.0) / accumulation
    step_bonus = masked / max(1.0, float(step_action_tokens)) * processes
    return (trl_loss + entropy_coef * trl_bonus) * scale - entropy_coef * step_bonus
