"""Generation with a trainer's policy: HF `generate` on the (unwrapped, gathered) training model, or TRL's vLLM
backend. The trainer hands over what generation needs as a `TrainerPolicy` (explicit values, read-only); nothing here
writes into the trainer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import RolloutConfig
from .generation import ModelGenerator


@dataclass
class TrainerPolicy:
    """What a rollout needs from a trainer to generate with its policy (built by `EPOTrainer.rollout_policy`).

    Attributes:
        model_wrapped: the trainer's (possibly DDP / DeepSpeed-wrapped) model.
        accelerator: the trainer's `Accelerator` (device, process count, collectives).
        generation_config: the sampling settings (temperature, top-p, ...).
        eos_token_ids / pad_token_id: end-of-turn ids (an answer ends at the first) and the padding id.
        max_completion_length: the default completion-token budget of an episode.
        use_vllm / vllm_generation: TRL's vLLM backend, when used.
        sync_weights: called once when a rollout starts (pushes the current weights to vLLM when they changed).
        ds3_gather_for_generation / generation_kwargs / gradient_checkpointing_kwargs: TRL's
            `unwrap_model_for_generation` arguments.
        full_params: a context manager factory that makes the full parameters available (FSDP), or None.
    """

    model_wrapped: Any
    accelerator: Any
    generation_config: Any
    eos_token_ids: list[int]
    pad_token_id: int
    max_completion_length: int
    use_vllm: bool = False
    vllm_generation: Any = None
    sync_weights: Callable[[], None] | None = None
    ds3_gather_for_generation: bool = True
    generation_kwargs: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    full_params: Callable[[], Any] | None = None


class TrainerGenerator(ModelGenerator):
    """Generation with a trainer's policy: HF `generate` under TRL's `unwrap_model_for_generation` (entered once
    per rollout: under DeepSpeed ZeRO-3 the weights are gathered once per rollout, not once per turn), or TRL's vLLM
    backend when `use_vllm=True` (weights synced once per rollout). Across processes, every process makes the same
    number of generate calls, so collective backends (vLLM server, ZeRO-3 without gathering) never deadlock."""

    def __init__(self, policy: TrainerPolicy, config: RolloutConfig):
        self.policy = policy
        self.config = config
        self.model = policy.model_wrapped
        self.eos_token_ids = list(policy.eos_token_ids)
        self.pad_token_id = policy.pad_token_id
        self.generation_config = policy.generation_config
        self.returns_logprobs = bool(policy.use_vllm)
        self.default_budget = policy.max_completion_length
        self.show_progress = True
        self.reuse_kv_cache = config.reuse_kv_cache
        self._model = None
        self._stack = None

    @property
    def device(self):
        return self.policy.accelerator.device

    @property
    def synced(self) -> bool:
        return self.policy.accelerator.num_processes > 1

    def is_main_process(self) -> bool:
        return self.policy.accelerator.is_main_process

    def any_live_anywhere(self, local_live: bool) -> bool:
        if not self.synced:
            return local_live
        flag = torch.tensor([1.0 if local_live else 0.0], device=self.device)
        return bool(self.policy.accelerator.reduce(flag, reduction="sum").item() > 0)

    def __enter__(self):
        from trl.models import unwrap_model_for_generation

        policy = self.policy
        self._stack = contextlib.ExitStack()
        if policy.sync_weights is not None:
            policy.sync_weights()
        if policy.use_vllm:
            return self
        self._model = self._stack.enter_context(
            unwrap_model_for_generation(
                policy.model_wrapped,
                policy.accelerator,
                gather_deepspeed3_params=policy.ds3_gather_for_generation,
                generation_kwargs=policy.generation_kwargs,
                gradient_checkpointing_kwargs=policy.gradient_checkpointing_kwargs,
            )
        )
        self._stack.enter_context(torch.no_grad())
        if policy.full_params is not None:
            self._stack.enter_context(policy.full_params())
        return self

    def generate(self, contexts, limits):
        if self.policy.use_vllm:
            return self._generate_vllm(contexts, limits)
        return super().generate(contexts, limits)

    def _generate_vllm(self, contexts, limits):
        backend = self.policy.vllm_generation
        self.tokens_fed = sum(map(len, contexts))  # what vLLM's prefix cache spares is not visible here
        saved = backend.max_completion_length
        backend.max_completion_length = max(limits) if limits else 1
        try:
            _, completion_ids, logprobs, _ = backend.generate(prompts=contexts, images=None, num_generations=1)
        finally:
            backend.max_completion_length = saved
        results = []
        for ids, lps, limit in zip(completion_ids, logprobs or [None] * len(contexts), limits):
            ids = list(ids)[:limit]
            token_logprobs = [lp[0] for lp in lps][: len(ids)] if lps is not None else [math.nan] * len(ids)
            results.append((ids, token_logprobs))
        return results
