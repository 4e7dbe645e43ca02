"""Stand-ins for vLLM's engine pieces under TRL's real `VLLMGeneration` (vLLM itself needs a GPU).

`make_backend` builds a real `trl.generation.vllm_generation.VLLMGeneration` (its `generate` and `sync_weights` are
TRL's code) whose engine handles are fakes with vLLM's interfaces:

* `FakeServerClient`: TRL's `VLLMClient` (`generate` with ONE `max_tokens` per call, `update_named_params`,
  `reset_prefix_cache`, `get_server_info`); like the OpenAI-compatible server it refuses prompt + max_tokens over
  the maximum model length;
* `FakeLLM`: vLLM's offline `LLM` (`generate` with one `SamplingParams` or one per prompt, `sleep(level)` /
  `wake_up(tags)` with level 2 discarding the weights, `load_weights`, `reset_prefix_cache`, `max_model_len`); it
  refuses to generate while asleep or with discarded weights, and, like vLLM, refuses a prompt with no room left.

The answers come from a model with `answer(prompt, max_tokens) -> (ids, logprobs)`: `EchoModel` answers
deterministically from a hash of the prompt, so a test can check that every answer landed on its own context.
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from types import SimpleNamespace

import torch


def prompt_hash(prompt) -> int:
    return zlib.crc32(",".join(map(str, prompt)).encode()) % 1000


class EchoModel:
    """Answers with the prompt's hash: "<action>say H</action>" (with `encode`, a tokenizer's) or H-derived token ids,
    then EOS; the logprob of answer token i is -(1 + (H + i) % 50) / 100."""

    def __init__(self, eos_token_id: int, encode=None):
        self.eos_token_id = eos_token_id
        self.encode = encode
        self._lock = threading.Lock()  # a fast tokenizer is not safe to share between threads

    def full_answer(self, prompt) -> tuple[list[int], list[float]]:
        h = prompt_hash(prompt)
        if self.encode is not None:
            with self._lock:
                ids = list(self.encode(f"<action>say {h}</action>"))
        else:
            ids = [100 + h % 97] * (2 + h % 6)
        ids = ids + [self.eos_token_id]
        return ids, [-(1 + (h + i) % 50) / 100 for i in range(len(ids))]

    def answer(self, prompt, max_tokens: int, seed=None) -> tuple[list[int], list[float]]:
        ids, logprobs = self.full_answer(prompt)
        return ids[:max_tokens], logprobs[:max_tokens]

    def expected(self, prompt, limit: int) -> tuple[list[int], list[float]]:
        """What the rollout must keep of the answer to `prompt` under `limit` (EOS is the last answer token)."""
        return self.answer(prompt, limit)


class SamplingModel:
    """Samples from a real causal LM (temperature 1) and reports each token's logprob plus `offset(i)`: the
    numerical gap between vLLM's kernels and the trainer's."""

    def __init__(self, model, eos_token_id: int, offset=lambda i: 0.0):
        self.model, self.eos_token_id, self.offset = model, eos_token_id, offset

    @torch.no_grad()
    def answer(self, prompt, max_tokens: int, seed=None) -> tuple[list[int], list[float]]:
        """Like vLLM: a request with a `seed` samples from its own generator, one without from the global one."""
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        context, ids, logprobs = torch.tensor([list(prompt)]), [], []
        for i in range(max_tokens):
            logp = torch.log_softmax(self.model(input_ids=context).logits[0, -1].float(), -1)
            token = int(torch.multinomial(logp.exp(), 1, generator=generator))
            ids.append(token)
            logprobs.append(float(logp[token]) + self.offset(i))
            context = torch.cat([context, torch.tensor([[token]])], 1)
            if token == self.eos_token_id:
                break
        return ids, logprobs


class FakeSamplingParams:
    """vLLM's `SamplingParams`: the keyword arguments, as attributes."""

    def __init__(self, **kwargs):
        self.n, self.max_tokens, self.logprobs = 1, 16, None
        self.__dict__.update(kwargs)


def install_fake_vllm(monkeypatch) -> None:
    """Give TRL's vLLM module the names it imports from vLLM when vLLM is installed."""
    import trl.generation.vllm_generation as trl_vllm

    monkeypatch.setattr(trl_vllm, "SamplingParams", FakeSamplingParams, raising=False)
    monkeypatch.setattr(trl_vllm, "StructuredOutputsParams", dict, raising=False)


class FakeServerClient:
    def __init__(self, model, max_model_len: int | None = None):
        self.model, self.max_model_len = model, max_model_len
        self.calls: list[dict] = []
        self.syncs = self.prefix_resets = 0

    def generate(self, prompts, features=None, n=1, max_tokens=16, logprobs=0, generation_kwargs=None, **sampling):
        self.calls.append({"prompts": [list(p) for p in prompts], "max_tokens": max_tokens, **sampling})
        for prompt in prompts:
            if self.max_model_len is not None and len(prompt) + max_tokens > self.max_model_len:
                raise ValueError(
                    f"Request failed: 400, prompt {len(prompt)} + max_tokens {max_tokens} > max_model_len"
                )
        seed = (generation_kwargs or {}).get("seed")  # the server builds SamplingParams(**generation_kwargs)
        answers = [self.model.answer(prompt, max_tokens, seed=seed) for prompt in prompts for _ in range(n)]
        return {
            "prompt_ids": [list(p) for p in prompts],
            "completion_ids": [ids for ids, _ in answers],
            "logprobs": [[[lp] for lp in lps] for _, lps in answers],
            "logprob_token_ids": [[[t] for t in ids] for ids, _ in answers],
        }

    def update_named_params(self, metadata, params):
        for _ in params:
            pass
        self.syncs += 1

    def reset_prefix_cache(self):
        self.prefix_resets += 1

    def get_server_info(self):
        return {"model_config": {"max_model_len": self.max_model_len}}


class FakeLLM:
    """vLLM's offline engine on one rank. `log`: a list shared by the ranks of a TP group, to check that they all
    submit the same requests (vLLM's tensor parallelism needs it)."""

    def __init__(self, model, max_model_len: int | None = None, log: list | None = None):
        self.model, self.max_model_len, self.log = model, max_model_len, log
        self.calls: list[list[tuple[tuple[int, ...], int]]] = []
        self.syncs = self.sleeps = self.prefix_resets = 0
        self.wakes: list[tuple[str, ...]] = []
        self.asleep = {"weights": False, "kv_cache": False}
        self.weights_valid, self._loading = True, False
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load_weights))
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)),
            model_config=SimpleNamespace(max_model_len=max_model_len),
        )

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self._loading = False
        if any(self.asleep.values()) or not self.weights_valid:
            raise RuntimeError(f"generate on a sleeping engine: {self.asleep}, weights valid {self.weights_valid}")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        call = [(tuple(p["prompt_token_ids"]), sp.max_tokens) for p, sp in zip(prompts, params, strict=True)]
        self.calls.append(call)
        if self.log is not None:
            self.log.append(call)
        outputs = []
        for prompt, sp in zip(prompts, params):
            ids = prompt["prompt_token_ids"]
            room = sp.max_tokens
            if self.max_model_len is not None:
                if len(ids) >= self.max_model_len:
                    raise ValueError(
                        f"The prompt (length {len(ids)}) is longer than max_model_len {self.max_model_len}"
                    )
                room = min(room, self.max_model_len - len(ids))  # the engine stops at the maximum model length
            answer, logprobs = self.model.answer(ids, room, seed=getattr(sp, "seed", None))
            steps = [{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(answer, logprobs)]
            completion = SimpleNamespace(token_ids=answer, logprobs=steps)
            outputs.append(SimpleNamespace(prompt_token_ids=list(ids), outputs=[completion]))
        return outputs

    def sleep(self, level: int = 1):
        self._loading = False
        self.sleeps += 1
        self.asleep = {"weights": True, "kv_cache": True}
        if level == 2:
            self.weights_valid = False

    def wake_up(self, tags=None):
        self._loading = False
        tags = tuple(tags or ("weights", "kv_cache"))
        self.wakes.append(tags)
        for tag in tags:
            self.asleep[tag] = False

    def reset_prefix_cache(self):
        self._loading = False
        self.prefix_resets += 1

    def _load_weights(self, weights):
        if self.asleep["weights"]:
            raise RuntimeError("load_weights into sleeping (unmapped) weight memory")
        if not self._loading:  # the first parameter of a sync
            self.syncs += 1
            self._loading = True
        self.weights_valid = True


def make_backend(
    mode: str,
    accelerator,
    *,
    client=None,
    llm=None,
    tensor_parallel_size: int = 1,
    tp_group=None,
    sleep: bool = False,
    model=None,
    dist=None,
    max_model_length: int | None = None,
):
    """A real TRL `VLLMGeneration` with the attributes its `__init__` sets (TRL's defaults), around fake engine
    handles; with `sleep`, the engine starts asleep at level 2, as `_init_vllm` leaves it."""
    from trl.generation.vllm_generation import VLLMGeneration

    backend = object.__new__(VLLMGeneration)
    backend.model = model if model is not None else torch.nn.Linear(2, 2)
    backend.accelerator = accelerator
    backend._dist = dist or SimpleNamespace(
        is_fsdp=False, fsdp_version=None, gather_params=lambda params: contextlib.nullcontext()
    )
    backend.processing_class = None
    backend.mode = mode
    backend.structured_outputs_regex = None
    backend.tensor_parallel_size = tensor_parallel_size
    backend.max_model_length = max_model_length
    backend.enable_sleep_mode = sleep
    backend.repetition_penalty, backend.temperature, backend.top_p, backend.top_k, backend.min_p = (
        1.0,
        1.0,
        1.0,
        0,
        0.0,
    )
    backend.max_completion_length, backend.logprobs, backend.generation_kwargs = 16, 0, {}
    backend._weight_metadata = None
    if client is not None:
        backend.vllm_client = client
    if tensor_parallel_size > 1:
        backend.tp_group = tp_group
    backend.llm = llm
    if sleep:
        llm.sleep(level=2)
    backend._llm_weights_sleeping = sleep
    return backend
