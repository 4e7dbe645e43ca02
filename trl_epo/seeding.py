"""Owned randomness: an evaluation samples from its own seeded streams and leaves the training streams untouched.

Training samples its rollouts from the process-global RNGs (torch's CPU and CUDA generators, which HF `generate`
draws from, and Python's `random`), seeded per process by TRL / transformers from `args.seed`. An evaluation in the
middle of training must neither read those streams (its episodes would depend on the training history) nor reseed
them (every rollout after it would start from a state fixed by the eval seed: runs with different `seed`s would share
their sampling stream, and in a multi-process run both processes would draw the same answers for the members of a
GRPO group split across them).

`isolated_rng(seed)` runs a block on a forked copy of the global RNGs seeded with `seed` and puts the training
state back afterwards, bit for bit. `derive_seed` turns an eval seed and a few integers (process, call, request)
into independent 63-bit seeds: vLLM samples per request with `SamplingParams(seed=...)`, so that an eval seed means
the same on both backends: the same evaluation (model, tasks, seeds, process count, batch layout) plays the same
episodes, whatever ran before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import torch


def derive_seed(seed: int, *keys: int) -> int:
    """A seed in [0, 2**63) that depends on `seed` and `keys` only (a hash: nearby inputs give unrelated seeds)."""
    text = ",".join(str(int(k)) for k in (seed, *keys))
    return int.from_bytes(hashlib.sha256(f"trl_epo/{text}".encode()).digest()[:8], "little") >> 1


def _cuda_devices() -> list[int]:
    # every visible device: torch.manual_seed seeds them all, so all of them are restored
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@contextlib.contextmanager
def isolated_rng(seed: int | None) -> Iterator[None]:
    """Run the block on its own copy of torch's CPU and CUDA generators and Python's `random`, seeded with `seed`
    (None: not reseeded, only isolated), and restore the previous states on exit (also on an exception)."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=_cuda_devices()):
        try:
            if seed is not None:
                torch.manual_seed(seed)  # CPU and every CUDA device
                random.seed(seed)
            yield
        finally:
            random.setstate(python_state)
