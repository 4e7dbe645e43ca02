"""Multi-turn generation with TRL's vLLM backend (`trl.generation.vllm_generation.VLLMGeneration`): ragged-safe
across processes, and one engine session per rollout (wake and sync the weights once, sleep once).

Why not `VLLMGeneration.generate` (TRL 1.16):

1. In server mode and in colocate mode with `vllm_tensor_parallel_size > 1` it gathers every process's prompts,
   generates them with the *calling* process's `max_completion_length` and hands process i the slice
   `[i * n, (i + 1) * n)` of the results: right only when every process sends the same number n of prompts with the
   same limit. A rollout sends only its live episodes, each with its own limit, so counts and limits differ.
2. With `vllm_enable_sleep_mode=True` it sleeps at level 2 (weights discarded) after every call: the next turn
   re-syncs all weights (under ZeRO-3 a gather per parameter) and loses the prefix cache.

Here every request carries a stable id `(process index, position)` and its own `max_tokens`, and answers are mapped
back by id:

* server: all processes gather their requests (a process with nothing live sends an empty list: it still joins
  every collective), process 0 sends them to the server grouped by `max_tokens` (TRL's client takes one `max_tokens`
  per call; the groups go out concurrently, so the server batches them) and broadcasts the answers keyed by id;
* colocate, TP > 1: the TP group gathers its requests and every rank submits the same list to `LLM.generate` with
  one `SamplingParams` per request (vLLM's tensor parallelism needs the same inputs on every rank of the group);
* colocate, TP = 1: `LLM.generate` on this process's own requests, one `SamplingParams` per request.

Answers are cut at their first end-of-turn id and at their limit, their sampled-token logprobs with them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, gather_object, is_peft_model

from ..seeding import derive_seed


RequestId = tuple[int, int]
Answer = tuple[list[int], list[float] | None]


def sampling_overrides(generation_config) -> dict[str, Any]:
    """The vLLM sampling settings of a `GenerationConfig` (evaluation's temperature), replacing TRL's training ones."""
    if generation_config is None:
        return {}
    sample = bool(getattr(generation_config, "do_sample", True))
    return {
        "temperature": float(generation_config.temperature or 1.0) if sample else 0.0,
        "top_p": float(generation_config.top_p or 1.0) if sample else 1.0,
        "top_k": int(generation_config.top_k or 0) if sample else 0,
        "min_p": float(getattr(generation_config, "min_p", None) or 0.0),
        "repetition_penalty": float(generation_config.repetition_penalty or 1.0),
    }


def engine_context_limit(backend, accelerator) -> int | None:
    """The engine's maximum model length (prompt + answer tokens): `vllm_max_model_length` when set, else what the
    engine reports (colocate: its model config; server: process 0 asks the server and broadcasts the answer, so every
    process must call this). None when unknown."""
    value = getattr(backend, "max_model_length", None)
    if not value and backend.mode == "colocate":
        engine = getattr(backend.llm, "llm_engine", None)
        config = getattr(engine, "model_config", None) or getattr(
            getattr(engine, "vllm_config", None), "model_config", None
        )
        value = getattr(config, "max_model_len", None)
    elif not value:
        if accelerator.is_main_process:
            try:
                value = backend.vllm_client.get_server_info()["model_config"]["max_model_len"]
            except (KeyError, TypeError, RuntimeError, OSError):  # an older server: the limit stays unknown
                value = None
        if accelerator.num_processes > 1:
            value = broadcast_object_list([value], from_process=0)[0]
    return int(value) if value else None


class VLLMSession:
    """TRL's vLLM backend during one rollout (see the module docstring).

    Args:
        backend: TRL's `VLLMGeneration` (its mode, engine handles and sampling settings are read, never replaced).
        accelerator: the trainer's `Accelerator` (process index and count).
        eos_token_ids: end-of-turn ids: an answer ends at the first one.
        sampling: sampling settings that replace the backend's (`sampling_overrides`), e.g. evaluation's temperature.
    """

    def __init__(self, backend, accelerator, eos_token_ids: Sequence[int], sampling: dict[str, Any] | None = None):
        self.backend = backend
        self.accelerator = accelerator
        self.eos_token_ids = set(eos_token_ids)
        self.sampling = dict(sampling or {})
        self.seed: int | None = None  # `seed_sampling`: requests seeded from it (evaluation), else vLLM's own seeds
        self._calls = 0

    def seed_sampling(self, seed: int | None) -> None:
        """Seed every following request from `seed` (each request gets `derive_seed(seed, call, process, position)`,
        the server's calls `derive_seed(seed, call, limit)`), or stop seeding (None). An evaluation seeds its engine
        so that an eval seed fixes its episodes as it does with HF `generate`."""
        self.seed, self._calls = seed, 0

    @property
    def sleeps(self) -> bool:
        """Colocated vLLM with sleep mode: the engine sleeps between rollouts (level 2: weights discarded)."""
        return self.backend.mode == "colocate" and bool(self.backend.enable_sleep_mode)

    # ---- one session per rollout
    def open(self, sync_weights: Callable[[bool], bool] | None) -> int:
        """Wake the engine and push the training weights once for the rollout; returns the weight syncs made (0 or 1).

        `sync_weights(force)` pushes the weights when they changed since the last push, or always with `force` (the
        engine slept and discarded them), and says whether it pushed. TRL's `sync_weights` wakes the weights, loads
        them and resets the prefix cache; the KV cache is woken here, and stays awake (prefix cache included) until
        `close`."""
        backend = self.backend
        force = self.sleeps and bool(getattr(backend, "_llm_weights_sleeping", False))
        if sync_weights is None:
            synced = force
            if force:
                backend.sync_weights()
        else:
            synced = bool(sync_weights(force))
        if force and not synced:
            raise RuntimeError(
                "The vLLM engine slept (its weights discarded) but the rollout's weight sync pushed none."
            )
        if self.sleeps:
            backend.llm.wake_up(tags=["kv_cache"])
        return int(synced)

    def close(self) -> None:
        """Put a sleep-mode engine to sleep once the rollout is over (its memory goes back to training)."""
        if self.sleeps:
            self.backend.llm.sleep(level=2)
            self.backend._llm_weights_sleeping = True  # TRL's flag: the next session must push the weights

    # ---- ragged-safe generation
    def generate(self, contexts: Sequence[Sequence[int]], limits: Sequence[int]) -> list[Answer]:
        """The answer (token ids, sampled-token logprobs) of every context, each with its own token limit. Every
        process calls it once per turn, with however many contexts it has (none included)."""
        index = self.accelerator.process_index
        requests = [((index, i), list(c), max(1, int(n))) for i, (c, n) in enumerate(zip(contexts, limits))]
        self._calls += 1  # every process calls once per turn, so the call count is the same on all of them
        if self.backend.mode == "server":
            answers = self._server(requests)
        elif self.backend.mode == "colocate":
            answers = self._colocate(requests)
        else:
            raise ValueError(f"vllm_mode must be 'server' or 'colocate', got {self.backend.mode!r}.")
        return [self._cut(*answers[rid], limit) for rid, _, limit in requests]

    def _server(self, requests) -> dict[RequestId, Answer]:
        processes = self.accelerator.num_processes
        everyone = gather_object(requests) if processes > 1 else requests
        answers = self._serve(everyone) if self.accelerator.is_main_process else None
        if processes > 1:
            answers = broadcast_object_list([answers], from_process=0)[0]
        return answers

    def _serve(self, requests) -> dict[RequestId, Answer]:
        """Process 0: one client call per distinct limit, sent concurrently."""
        groups: dict[int, list] = defaultdict(list)
        for rid, prompt, limit in requests:
            groups[limit].append((rid, prompt))
        client, settings = self.backend.vllm_client, self._settings()
        extra = settings.pop("generation_kwargs")

        def send(limit: int, group: list) -> dict[RequestId, Answer]:
            kwargs = extra if self.seed is None else {**extra, "seed": derive_seed(self.seed, self._calls, limit)}
            output = client.generate(
                prompts=[prompt for _, prompt in group],
                n=1,
                max_tokens=limit,
                structured_outputs_regex=self.backend.structured_outputs_regex,
                generation_kwargs=kwargs,
                **settings,
            )
            logprobs = output.get("logprobs") or [None] * len(group)
            first = [None if lps is None else [lp[0] if lp else None for lp in lps] for lps in logprobs]
            return {rid: (list(ids), lps) for (rid, _), ids, lps in zip(group, output["completion_ids"], first)}

        answers: dict[RequestId, Answer] = {}
        if groups:
            with ThreadPoolExecutor(max_workers=min(8, len(groups))) as pool:
                for part in pool.map(lambda item: send(*item), sorted(groups.items())):
                    answers.update(part)
        return answers

    def _colocate(self, requests) -> dict[RequestId, Answer]:
        backend = self.backend
        size = backend.tensor_parallel_size
        if size > 1:
            gathered = [None] * size
            torch.distributed.all_gather_object(gathered, requests, group=backend.tp_group)
            everyone = [request for part in gathered for request in part]
        else:
            everyone = requests
        if not everyone:  # the same list on every rank of the group: all skip together
            return {}
        if size > 1 and is_peft_model(backend.model):  # as TRL: drain NCCL before vLLM's TP collectives
            torch.distributed.barrier(device_ids=[self.accelerator.local_process_index])
        if self.seed is None:
            params: dict[int, Any] = {}
            sampling = [params.setdefault(limit, self._sampling_params(limit)) for _, _, limit in everyone]
        else:  # one seed per request, the same on every rank of a TP group
            sampling = [
                self._sampling_params(limit, derive_seed(self.seed, self._calls, *rid)) for rid, _, limit in everyone
            ]
        outputs = backend.llm.generate(
            [{"prompt_token_ids": prompt} for _, prompt, _ in everyone], sampling_params=sampling, use_tqdm=False
        )
        answers = {}
        for (rid, _, _), output in zip(everyone, outputs, strict=True):
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            logprobs = None
            if completion.logprobs is not None:  # one dict per token, keyed by token id: take the sampled token's
                logprobs = [
                    step[token].logprob if token in step else None for step, token in zip(completion.logprobs, ids)
                ]
            answers[rid] = (ids, logprobs)
        return answers

    # ---- sampling settings
    def _settings(self) -> dict[str, Any]:
        """TRL's sampling settings (its `GRPOConfig` values), with `sampling` applied. `logprobs=0`: the sampled
        token's logprob only, which is all the importance-sampling correction needs."""
        backend = self.backend
        settings = {
            "repetition_penalty": backend.repetition_penalty,
            "temperature": backend.temperature,
            "top_p": backend.top_p,
            "top_k": backend.top_k,
            "min_p": 0.0 if backend.min_p is None else backend.min_p,
            "logprobs": 0,
        }
        settings.update(self.sampling)
        # the per-request limit and one answer per request are this module's: a user's `generation_kwargs` keep the rest
        extra = {k: v for k, v in (backend.generation_kwargs or {}).items() if k not in ("n", "max_tokens")}
        settings["generation_kwargs"] = extra
        return settings

    def _sampling_params(self, limit: int, seed: int | None = None):
        from trl.generation import vllm_generation

        if not hasattr(vllm_generation, "SamplingParams"):
            raise ImportError("Colocated vLLM generation needs vLLM: `pip install trl[vllm]`.")
        settings = self._settings()
        kwargs = {"n": 1, **settings, **settings.pop("generation_kwargs")}
        kwargs.update(n=1, max_tokens=limit)
        if seed is not None:
            kwargs["seed"] = seed
        if self.backend.structured_outputs_regex is not None:
            kwargs["structured_outputs"] = vllm_generation.StructuredOutputsParams(
                regex=self.backend.structured_outputs_regex
            )
        elif isinstance(kwargs.get("structured_outputs"), dict):
            kwargs["structured_outputs"] = vllm_generation.StructuredOutputsParams(**kwargs["structured_outputs"])
        return vllm_generation.SamplingParams(**kwargs)

    def _cut(self, ids: list[int], logprobs: list[float | None] | None, limit: int) -> Answer:
        """The answer up to its first end-of-turn id (kept) and at most `limit` tokens; logprobs cut alike (NaN where
        the engine gave none: the importance-sampling correction then leaves the token alone)."""
        ids = list(ids)[:limit]
        for i, token in enumerate(ids):
            if token in self.eos_token_ids:
                ids = ids[: i + 1]
                break
        if logprobs is None:
            return ids, [math.nan] * len(ids)
        values = [math.nan if lp is None else float(lp) for lp in logprobs[: len(ids)]]
        return ids, values + [math.nan] * (len(ids) - len(values))
