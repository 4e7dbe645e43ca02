"""The learning-rate schedule of env-row training: TRL's schedule, optionally stepping once per rollout of K
optimizer steps (`env_lr_per_rollout`), as the paper's code steps its scheduler once per rollout."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler


class _PerRollout:
    """An LR-lambda that advances once per rollout of `k` optimizer steps. LambdaLR saves a callable object's
    `__dict__` in its state: here only `k`, so a checkpoint's scheduler.pt holds no code and loads with
    `weights_only=True` (the wrapped function is rebuilt from the config on resume)."""

    __slots__ = ("fn", "k")

    def __init__(self, fn, k: int):
        self.fn, self.k = fn, k

    @property
    def __dict__(self) -> dict:
        return {"k": self.k}

    def __call__(self, step: int) -> float:
        return self.fn(step // self.k)


def per_rollout_schedule(args) -> bool:
    """Whether the LR schedule steps once per rollout (`env_lr_per_rollout` with K > 1 updates per rollout)."""
    return bool(args.env_lr_per_rollout and args.steps_per_generation // args.gradient_accumulation_steps > 1)


def lr_scheduler_of(args, optimizer, num_training_steps: int):
    """The LR schedule of `args` (`lr_scheduler_type`, warm-up, `lr_scheduler_kwargs`) for `optimizer` over
    `num_training_steps` optimizer steps, as `Trainer.create_scheduler` builds it; with `per_rollout_schedule` it
    advances once per rollout of K steps (its warm-up and length counted in rollouts)."""
    updates = args.steps_per_generation // args.gradient_accumulation_steps
    per_rollout = per_rollout_schedule(args)
    steps = math.ceil(num_training_steps / updates) if per_rollout else num_training_steps
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    if not per_rollout:
        return scheduler
    if not isinstance(scheduler, LambdaLR):
        raise ValueError(
            f"env_lr_per_rollout supports the LambdaLR schedules of transformers; {args.lr_scheduler_type!r} "
            "is not one: pick e.g. 'cosine', 'linear', 'constant_with_warmup' or 'cosine_with_min_lr'."
        )
    scheduler.lr_lambdas = [_PerRollout(fn, updates) for fn in scheduler.lr_lambdas]
    return scheduler
