"""Batched next-answer generation with a Hugging Face causal LM (`model.generate`), with exact KV-cache reuse across
the turns of full-context conversations (`ModelGenerator`, `_CacheState`).

A generator is the rollout's only view of the policy: `generate(contexts, limits)` returns the next answer (token ids
and, when the backend gives them, sampling logprobs) for every live episode in one batched call. The trainer's policy
and vLLM are in `backends.py`.
"""

from __future__ import annotations

import copy

import torch


def model_context_limit(model) -> int | None:
    """The longest context (prompt + answer) a model takes: its `max_position_embeddings` (the text model's, for a
    multimodal config), or None when its config has none. The rollout ends an episode whose context would not fit
    as truncated ("context_limit"), as with vLLM's `max_model_len`, instead of feeding the model positions it was
    never trained on."""
    model = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


class _NoProgress:
    def update(self, n=1):
        pass

    def close(self):
        pass


class ModelGenerator:
    """Batched next-answer generation with a Hugging Face causal LM (`model.generate`), outside any trainer: for
    evaluation and tests. Use it as a context manager around a rollout.

    Args:
        model: a causal LM with `generate`.
        tokenizer: its tokenizer (pad and eos tokens set).
        generation_config: a `transformers.GenerationConfig`; by default sampling at `temperature`.
        max_completion_length: the default completion-token budget of an episode.
        reuse_kv_cache: keep the KV cache of the last call and, when every new context extends one of its rows (the
            full-context conversation: context + kept answer + observation), feed only the new tokens (see
            `_CacheState`). Off, or when the contexts do not extend the last ones (windowed prompts, a new wave),
            every call encodes its contexts from scratch.
    """

    returns_logprobs = False
    reuse_kv_cache = True
    max_context_tokens: int | None = None  # longest context the model takes (`model_context_limit`)
    tokens_fed = 0  # context tokens the last call fed to the model (the new tokens only, when the cache was reused)
    _cache_state = None

    def __init__(
        self,
        model,
        tokenizer,
        generation_config=None,
        temperature: float = 1.0,
        max_completion_length: int = 4096,
        progress_bar: bool = True,
        reuse_kv_cache: bool = True,
    ):
        from transformers import GenerationConfig

        self.model = model
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id not in eos:
            eos = [tokenizer.eos_token_id, *eos]
        self.eos_token_ids = eos
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        self.generation_config = generation_config or GenerationConfig(
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            eos_token_id=eos,
            pad_token_id=self.pad_token_id,
        )
        self.default_budget = max_completion_length
        self.show_progress = progress_bar
        self.reuse_kv_cache = reuse_kv_cache
        self.max_context_tokens = model_context_limit(model)
        self._model = None
        self._stack = None

    @property
    def device(self):
        return next(self.model.parameters()).device

    def __enter__(self):
        import contextlib

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(torch.no_grad())
        self._model = self.model
        return self

    def __exit__(self, *exc):
        self._cache_state = None  # the weights change before the next rollout
        stack, self._stack, self._model = self._stack, None, None
        if stack is not None:
            stack.close()

    def is_main_process(self) -> bool:
        return True

    def progress(self, total: int, enabled: bool):
        if not (enabled and self.show_progress and self.is_main_process()):
            return _NoProgress()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="rollout turns", leave=False)

    def any_live_anywhere(self, local_live: bool) -> bool:
        return local_live

    @property
    def synced(self) -> bool:
        return False

    def generate(self, contexts: list[list[int]], limits: list[int]) -> list[tuple[list[int], list[float] | None]]:
        """One batched call: the next answer (token ids, cut at the first end-of-turn token and at its limit) for
        every context."""
        from trl.trainer.utils import pad

        if self._model is None:
            raise RuntimeError("Use the generator as a context manager around the rollout (`with generator:`).")
        dummy = not contexts  # keep collectives aligned when this process has nothing left to generate
        if dummy:
            self._cache_state = None
            if not self.synced:
                return []
            contexts, limits = [[self.pad_token_id]], [1]
        generation_config = copy.deepcopy(self.generation_config)
        generation_config.max_new_tokens = max(limits)
        keep_cache = not dummy and self.reuse_kv_cache and _cache_reuse_is_exact(generation_config)
        state, self._cache_state = self._cache_state, None  # a stale cache is freed before this call allocates
        reuse = state.extend(contexts, self.pad_token_id, self.device) if keep_cache and state is not None else None
        if reuse is not None:
            input_ids, attention_mask, cache, self.tokens_fed = reuse
        else:
            tensors = [torch.tensor(ids) for ids in contexts]
            input_ids = pad(tensors, padding_value=self.pad_token_id, padding_side="left").to(self.device)
            attention_mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left")
            attention_mask, cache, self.tokens_fed = attention_mask.to(self.device), None, sum(map(len, contexts))
        del state
        if keep_cache:
            generation_config.return_dict_in_generate = True
        output = self._model.generate(
            input_ids=input_ids, attention_mask=attention_mask, cache=cache, generation_config=generation_config
        )
        sequences = output.sequences if hasattr(output, "sequences") else output
        if dummy:
            self.tokens_fed = 0
            return []
        results = []
        for ids, limit in zip(sequences[:, input_ids.size(1) :].tolist(), limits):
            cut = ids[:limit]
            for i, token in enumerate(cut):
                if token in self.eos_token_ids:
                    cut = cut[: i + 1]
                    break
            results.append((cut, None))
        if keep_cache:
            self._cache_state = _CacheState.build(
                output.cache, sequences, attention_mask, contexts, [ids for ids, _ in results]
            )
        return results


def _cache_reuse_is_exact(generation_config) -> bool:
    """Whether continuing from a cache with masked holes samples exactly like encoding the contexts afresh: no logits
    processor may look at the raw `input_ids` (which then contain the holes' tokens), and the cache must be the
    default dynamic one."""

    def get(name):
        return getattr(generation_config, name, None)

    return (
        get("use_cache") is not False
        and get("cache_implementation") in (None, "dynamic")
        and get("repetition_penalty") in (None, 1.0)
        and get("encoder_repetition_penalty") in (None, 1.0)
        and not get("no_repeat_ngram_size")
        and get("bad_words_ids") is None
        and get("sequence_bias") is None
        and (get("num_beams") or 1) == 1
        and (get("num_return_sequences") or 1) == 1
        and get("prompt_lookup_num_tokens") is None
        and get("penalty_alpha") is None
        and get("dola_layers") is None
        and not get("min_length")  # an absolute length would count the holes (min_new_tokens is fine)
        and get("watermarking_config") is None
    )


class _CacheState:
    """The KV cache of the last batched `generate` call and the row layout it was computed on, so that the next
    turn of a full-context conversation feeds only its new tokens instead of re-encoding the whole conversation.

    Row r of the last call holds `[left padding][context_r][generated_r]`; the episode kept `answer_r`, a prefix of
    `generated_r` (cut at its end-of-turn token or its limit). Its next context is `context_r + answer_r + suffix`
    (observation and the next generation prompt). The next call's row is the old row followed by the left-padded
    suffix, with attention mask 0 on every position the fresh encoding would not contain (the padding, the generated
    tokens after `answer_r`, the suffix padding): position ids come from the mask (HF `generate` takes them from its
    cumulative sum), so each real token sees the same tokens at the same positions as when encoded afresh; the
    logits agree to float rounding (tested). Only plain `DynamicCache` layers qualify: a sliding window or a
    recurrent layer would count the holes.
    """

    def __init__(self, cache, rows: list[list[int]], masks: list[list[int]], prefixes: list[list[int]]):
        self.cache, self.rows, self.masks, self.prefixes = cache, rows, masks, prefixes

    @classmethod
    def build(cls, cache, sequences, attention_mask, contexts, answers) -> _CacheState | None:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        width = sequences.size(1)
        if not (isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)):
            return None
        if cache.get_seq_length() != width - 1:  # the last sampled token is never fed: the cache holds the rest
            return None
        rows = sequences.tolist()
        input_width = attention_mask.size(1)
        masks = []
        for mask, answer in zip(attention_mask.tolist(), answers):
            masks.append(mask + [1] * len(answer) + [0] * (width - input_width - len(answer)))
        return cls(cache, rows, masks, [list(c) + list(a) for c, a in zip(contexts, answers)])

    def extend(self, contexts, pad_token_id: int, device):
        """Inputs that continue this cache for `contexts` (input ids, attention mask, cache, new tokens fed), or None
        when some context does not extend a row of the last call (in order: rows of finished episodes drop out), or
        when the holes would outweigh the tokens (re-encoding then compacts the rows)."""
        matched, j = [], 0
        for context in contexts:
            while j < len(self.prefixes) and not (
                len(context) > len(self.prefixes[j]) and context[: len(self.prefixes[j])] == self.prefixes[j]
            ):
                j += 1
            if j == len(self.prefixes):
                return None
            matched.append(j)
            j += 1
        suffixes = [context[len(self.prefixes[r]) :] for context, r in zip(contexts, matched)]
        width = len(self.rows[0]) + max(map(len, suffixes))
        if width > 2 * max(map(len, contexts)):
            return None
        if matched != list(range(len(self.rows))):
            self.cache.batch_select_indices(torch.tensor(matched, device=device))
        input_ids, attention_mask = [], []
        for r, suffix in zip(matched, suffixes):
            fill = width - len(self.rows[r]) - len(suffix)
            input_ids.append(self.rows[r] + [pad_token_id] * fill + suffix)
            attention_mask.append(self.masks[r] + [0] * fill + [1] * len(suffix))
        fed = sum(len(suffix) + 1 for suffix in suffixes)  # + the last token of each old row, never fed before

        def as_tensor(rows):
            return torch.tensor(rows, dtype=torch.long, device=device)

        return as_tensor(input_ids), as_tensor(attention_mask), self.cache, fed
