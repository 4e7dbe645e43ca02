"""Generation with a trainer's policy: HF `generate` on the (unwrapped, gathered) training model, or TRL's vLLM
backend (`vllm.VLLMSession`: ragged-safe, one weight sync per rollout). The trainer hands over what generation needs
as a `TrainerPolicy` (explicit values, read-only); nothing here writes into the trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import RolloutConfig
from .generation import ModelGenerator, model_context_limit
from .vllm import VLLMSession


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
        sync_weights: `sync_weights(force) -> bool`, called once when a rollout starts: pushes the current weights to
            vLLM when they changed since the last push, or always with `force` (a sleeping engine discarded them);
            returns whether it pushed.
        max_context_tokens: vLLM's maximum model length (prompt + answer), or None: a context with no room left
            ends its episode as truncated ("context_limit") instead of reaching the engine. HF generate uses the
            model's `max_position_embeddings` (`generation.model_context_limit`).
        vllm_sampling: vLLM sampling settings replacing TRL's training ones (e.g. evaluation's temperature).
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
    sync_weights: Callable[[bool], bool] | None = None
    max_context_tokens: int | None = None
    vllm_sampling: dict[str, Any] = field(default_factory=dict)
    ds3_gather_for_generation: bool = True
    generation_kwargs: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    full_params: Callable[[], Any] | None = None


class TrainerGenerator(ModelGenerator):
    """Generation with a trainer's policy: HF `generate` under TRL's `unwrap_model_for_generation` (entered once
    per rollout: under DeepSpeed ZeRO-3 the weights are gathered once per rollout, not once per turn), or TRL's vLLM
    backend when `use_vllm=True` (`VLLMSession`: weights synced once per rollout, the engine awake for the whole
    rollout). Across processes, every process makes the same number of generate calls, so collective backends (vLLM
    server, TP groups, ZeRO-3 without gathering) never deadlock.

    Entering it again while entered is a no-op (evaluation holds one session over all its rollouts).
    `weight_syncs` counts the weight syncs it made."""

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
        # vLLM: the engine's max_model_len; HF generate: the model's maximum positions
        self.max_context_tokens = policy.max_context_tokens if policy.use_vllm else model_context_limit(self.model)
        self.weight_syncs = 0
        self._session = None
        if policy.use_vllm:
            self._session = VLLMSession(
                policy.vllm_generation, policy.accelerator, self.eos_token_ids, policy.vllm_sampling
            )
        self._depth = 0
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
        self._depth += 1
        if self._depth == 1:
            try:
                self._open()
            except BaseException:
                self._depth = 0
                raise
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth > 0:
            self._cache_state = None  # a nested rollout is over: its KV cache goes
            return
        try:
            if self._session is not None:
                self._session.close()
        finally:
            super().__exit__(*exc)

    def _open(self) -> None:
        from trl.models import unwrap_model_for_generation

        policy = self.policy
        self._stack = contextlib.ExitStack()
        if self._session is not None:
            self.weight_syncs += self._session.open(policy.sync_weights)
            return
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

    def seed_sampling(self, seed: int | None) -> None:
        """vLLM: seed the engine's requests from `seed` (None: unseeded); HF `generate` samples from torch's global
        RNG, which the evaluation seeds itself (`trl_epo.seeding.isolated_rng`)."""
        if self._session is not None:
            self._session.seed_sampling(seed)

    def generate(self, contexts, limits):
        if self._session is None:
            return super().generate(contexts, limits)
        if self._depth == 0:
            raise RuntimeError("Use the generator as a context manager around the rollout (`with generator:`).")
        self.tokens_fed = sum(map(len, contexts))  # what vLLM's prefix cache spares is not visible here
        return self._session.generate(contexts, limits)
