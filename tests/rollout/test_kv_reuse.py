"""KV-cache reuse across turns (`ModelGenerator(reuse_kv_cache=True)`): continuing from the last call's cache, with
masked holes, gives the logits and answers of encoding every conversation afresh, and feeds only the new tokens."""

import copy

import pytest
import torch

from trl_epo.envs.toy import ToyEnv, make_tasks
from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig
from trl_epo.rollout.generation import _CacheState


def random_ids(generator, n):
    return torch.randint(10, 300, (n,), generator=generator).tolist()


def fresh_last_logits(model, contexts, pad_token_id):
    width = max(map(len, contexts))
    ids = torch.tensor([[pad_token_id] * (width - len(c)) + c for c in contexts])
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, -1]


def test_continuing_from_the_cache_matches_fresh_encoding(tokenizer, make_model):
    """Rows of different lengths, answers cut at different limits (holes after them), a finished row dropped, the
    survivors extended by suffixes of different lengths: the next-token logits equal a fresh forward pass."""
    model = make_model().eval()
    rng = torch.Generator().manual_seed(0)
    gen = ModelGenerator(model, tokenizer, temperature=0, progress_bar=False)
    contexts = [random_ids(rng, n) for n in (5, 11, 3)]
    with gen:
        answers = [ids for ids, _ in gen.generate(contexts, [2, 6, 4])]
        assert [len(a) for a in answers] == [2, 6, 4]  # greedy on a random model: cut at the limits, not at EOS
        state = gen._cache_state
        assert isinstance(state, _CacheState)
        # Episode 1 finished; episodes 0 and 2 go on with observations of different lengths.
        nxt = [contexts[i] + answers[i] + random_ids(rng, n) for i, n in ((0, 7), (2, 2))]
        input_ids, attention_mask, cache, fed = state.extend(nxt, tokenizer.pad_token_id, gen.device)
        assert fed == 7 + 1 + 2 + 1
        assert cache.get_seq_length() == input_ids.size(1) - 1 - 7  # all but the new tokens are cached
        # The real tokens of each row, in order, are exactly the new context.
        for row, mask, context in zip(input_ids.tolist(), attention_mask.tolist(), nxt):
            assert [t for t, m in zip(row, mask) if m] == context
        with torch.no_grad():
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            start = cache.get_seq_length()
            cached = model(
                input_ids=input_ids[:, start:],
                attention_mask=attention_mask,
                past_key_values=cache,
                position_ids=position_ids[:, start:],
            ).logits[:, -1]
    fresh = fresh_last_logits(model, nxt, tokenizer.pad_token_id)
    torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)


def fresh_batches(contexts, answers_per_turn, keep):
    """The contexts of turns 2 and 3 (the suffixes replayed from the same seed)."""
    rng_suffix = torch.Generator().manual_seed(2)
    current, batches = contexts, []
    for turn in range(2):
        current = [current[i] + answers_per_turn[turn][i] + random_ids(rng_suffix, 3 + i) for i in keep[turn]]
        batches.append(current)
    return batches


def test_three_turns_with_and_without_reuse_answer_the_same(tokenizer, make_model):
    model = make_model().eval()
    rng = torch.Generator().manual_seed(1)
    contexts = [random_ids(rng, n) for n in (4, 9, 6, 2)]
    limits = [[3, 8, 5, 8], [8, 2, 6], [4, 8]]
    keep = [[0, 1, 3], [0, 2]]  # positions (in the current batch) of the episodes that go on
    transcripts = {}
    for reuse in (True, False):
        gen = ModelGenerator(model, tokenizer, temperature=0, progress_bar=False, reuse_kv_cache=reuse)
        rng_suffix = torch.Generator().manual_seed(2)
        current, answers_per_turn, fed = copy.deepcopy(contexts), [], []
        with gen:
            for turn in range(3):
                answers = [ids for ids, _ in gen.generate(current, limits[turn])]
                answers_per_turn.append(answers)
                fed.append(gen.tokens_fed)
                if turn < 2:
                    current = [current[i] + answers[i] + random_ids(rng_suffix, 3 + i) for i in keep[turn]]
        transcripts[reuse] = (answers_per_turn, fed, current)
    (with_reuse, fed_reuse, final), (without, fed_fresh, final_fresh) = transcripts[True], transcripts[False]
    assert with_reuse == without and final == final_fresh
    assert fed_fresh == [sum(map(len, contexts)), *fed_fresh[1:]] and fed_reuse[0] == fed_fresh[0]
    # With reuse a turn feeds each survivor's suffix plus the one old token the cache lacks.
    assert fed_reuse[1:] == [sum(3 + i + 1 for i in keep[0]), sum(3 + i + 1 for i in keep[1])]
    assert fed_fresh[1:] == [sum(map(len, batch)) for batch in fresh_batches(contexts, with_reuse, keep)]


def test_contexts_that_do_not_extend_the_last_call_are_encoded_afresh(tokenizer, make_model):
    model = make_model().eval()
    rng = torch.Generator().manual_seed(3)
    gen = ModelGenerator(model, tokenizer, temperature=0, progress_bar=False)
    with gen:
        first = [random_ids(rng, 6), random_ids(rng, 8)]
        gen.generate(first, [4, 4])
        windowed = [random_ids(rng, 7), random_ids(rng, 5)]  # fresh prompts (the paper's last-k windows)
        gen.generate(windowed, [4, 4])
        assert gen.tokens_fed == 12
    assert gen._cache_state is None  # leaving the rollout drops the cache (the weights change)


@pytest.mark.parametrize(
    "setting", [{"repetition_penalty": 1.3}, {"cache_implementation": "static"}, {"min_length": 2}]
)
def test_reuse_is_skipped_where_it_could_not_be_exact(tokenizer, make_model, setting):
    from transformers import GenerationConfig

    model = make_model().eval()
    config = GenerationConfig(
        do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **setting
    )
    gen = ModelGenerator(model, tokenizer, generation_config=config, progress_bar=False)
    rng = torch.Generator().manual_seed(4)
    with gen:
        contexts = [random_ids(rng, 6), random_ids(rng, 3)]
        answers = [ids for ids, _ in gen.generate(contexts, [3, 3])]
        assert gen._cache_state is None
        gen.generate([c + a + [11, 12] for c, a in zip(contexts, answers)], [3, 3])
        assert gen.tokens_fed == sum(len(c) + 3 + 2 for c in contexts)


def test_full_context_rollout_feeds_each_token_about_once(tokenizer, make_model):
    """The toy rollout (full context, 6 turns) with and without reuse: the same episodes, token for token; the
    re-encoding factor (tokens fed / tokens in the final sequences) drops from several to about one."""
    model = make_model().eval()
    tasks = make_tasks("train", 4)
    results = {}
    for reuse in (True, False):
        rollout = MultiTurnRollout(
            ToyEnv,
            RolloutConfig(
                pool_backend="inline", progress_bar=False, max_turns=6, max_turn_tokens=10, max_episode_tokens=4000
            ),
        )
        gen = ModelGenerator(model, tokenizer, temperature=0, progress_bar=False, reuse_kv_cache=reuse)
        batch = rollout.play(tasks, gen, tokenizer)
        episodes, stats = batch.episodes, batch.stats
        rollout.close()
        results[reuse] = ([e.completion_ids for e in episodes], stats)
    assert results[True][0] == results[False][0]
    assert results[False][1].refeed_ratio > 2.5
    assert results[True][1].refeed_ratio < 1.2
    assert results[True][1].generate_calls == results[False][1].generate_calls == 6
