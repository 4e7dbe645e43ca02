"""The task order of env-row training: TRL's `RepeatSampler` (each task repeated for its group, the same order on
every process), with each epoch's shuffle drawn from ``seed + epoch`` alone.

Why: TRL's sampler draws every epoch's permutation from one generator seeded once, so the order of epoch e depends on
how many epochs this sampler object has iterated. A run resumed at (or inside) epoch e >= 1 has a fresh sampler: it
would play epoch 0's order again, i.e. other tasks than the uninterrupted run (with several processes too, since
each builds its own sampler). Here the epoch is set by the training loop (`set_epoch`, as accelerate and
transformers call it), counted when nobody sets it, and set on resume from the checkpoint's epoch.
"""

from __future__ import annotations

import math

import torch
from trl.trainer.utils import RepeatSampler


class EpochRepeatSampler(RepeatSampler):
    """`RepeatSampler` whose epoch-e shuffle depends on (`seed`, e) only (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0

    @classmethod
    def of(cls, sampler: RepeatSampler) -> EpochRepeatSampler:
        return cls(
            sampler.data_source,
            mini_repeat_count=sampler.mini_repeat_count,
            batch_size=sampler.batch_size,
            repeat_count=sampler.repeat_count,
            shuffle=sampler.shuffle,
            seed=sampler.seed,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if self.shuffle and self.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(int(self.seed) + self.epoch)
        self.epoch += 1  # the next epoch, unless the training loop sets it
        return super().__iter__()


def epochs_completed(epoch: float) -> int:
    """Whole epochs behind a checkpoint whose trainer state reads `epoch` (a float that may be rounded down)."""
    return int(math.floor(epoch + 1e-6))
