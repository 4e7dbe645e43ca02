"""Ragged-safe vLLM generation across processes, against TRL's real `VLLMGeneration` with stand-in engines
(`helpers.fake_vllm`) and 2 processes emulated by threads whose collectives are barrier exchanges
(`helpers.threaded`): TRL's server mode and colocate mode with TP = 2 gather every process's prompts, and the rollout
sends only its live episodes, each with its own token limit. Every answer (and its logprobs) must land on the context
it was generated for, including on a process with nothing live, and colocate TP = 1 keeps working."""

import pytest
from helpers.fake_vllm import EchoModel, FakeLLM, FakeServerClient, install_fake_vllm, make_backend
from helpers.pool_envs import CountdownEnv
from helpers.threaded import FakeAccelerator, ThreadWorld

from trl_epo.envs.base import TaskSpec
from trl_epo.rollout import MultiTurnRollout, RolloutConfig, TrainerGenerator, TrainerPolicy
from trl_epo.tiny import build_tiny_tokenizer


EOS = 7
# Per rank, per generate call: (contexts, per-context token limits). Call 1 is ragged (3 vs 5 requests, all limits
# different); in call 2 rank 0 has nothing live and still has to take part.
REQUESTS = {
    0: [([[11, 12], [13], [14, 15, 16]], [4, 7, 2]), ([], [])],
    1: [([[21], [22, 23], [24], [25, 26], [27]], [9, 1, 5, 12, 3]), ([[28, 29], [30]], [6, 2])],
}


def policy(accelerator, backend, eos=EOS, syncs=None):
    def sync_weights(force=False):
        backend.sync_weights()
        if syncs is not None:
            syncs.append(force)
        return True

    return TrainerPolicy(
        model_wrapped=None,
        accelerator=accelerator,
        generation_config=None,
        eos_token_ids=[eos],
        pad_token_id=0,
        max_completion_length=400,
        use_vllm=True,
        vllm_generation=backend,
        sync_weights=sync_weights,
    )


def two_process_backends(mode, world, model, monkeypatch, log=None, sleep=False, engines=None):
    """`backend(rank, accelerator)` for `mode`: "server" (one server, its client on process 0 only, as TRL) or
    "colocate_tp2" (one engine per rank, both ranks one TP group; `engines[rank]` keeps them)."""
    world.patch(monkeypatch)
    install_fake_vllm(monkeypatch)
    client = FakeServerClient(model)

    def backend(rank, accelerator):
        if mode == "server":
            return make_backend("server", accelerator, client=client if rank == 0 else None)
        llm = FakeLLM(model, log=log)
        if engines is not None:
            engines[rank] = llm
        return make_backend("colocate", accelerator, llm=llm, tensor_parallel_size=2, tp_group=(0, 1), sleep=sleep)

    return backend, client


@pytest.mark.parametrize("mode", ["server", "colocate_tp2"])
def test_each_process_gets_the_answers_of_its_own_requests_with_their_own_limits(mode, monkeypatch):
    world, model, log = ThreadWorld(2), EchoModel(EOS), []
    backend_of, client = two_process_backends(mode, world, model, monkeypatch, log)

    def play(rank):
        accelerator = FakeAccelerator(world, rank)
        generator = TrainerGenerator(policy(accelerator, backend_of(rank, accelerator)), RolloutConfig())
        with generator:
            return [generator.generate(contexts, limits) for contexts, limits in REQUESTS[rank]]

    results = world.run(play)
    for rank in (0, 1):
        for (contexts, limits), answers in zip(REQUESTS[rank], results[rank]):
            assert len(answers) == len(contexts), f"rank {rank}: {len(answers)} answers for {len(contexts)} contexts"
            for context, limit, (ids, logprobs) in zip(contexts, limits, answers):
                assert (ids, logprobs) == model.expected(context, limit), f"rank {rank}, context {context}"
    requested = sorted((tuple(c), n) for calls in REQUESTS.values() for cs, ns in calls for c, n in zip(cs, ns))
    if mode == "server":  # every prompt sent once, with its own limit (one max_tokens per client call)
        sent = sorted((tuple(p), call["max_tokens"]) for call in client.calls for p in call["prompts"])
    else:  # both ranks of the TP group submitted the same requests (vLLM's TP needs it), each with its own limit
        assert len(log) == 4 and log[0::2] == log[1::2]
        sent = sorted(request for call in log[0::2] for request in call)
    assert sent == requested


def test_colocate_tp1_generates_only_its_own_requests_with_their_own_limits(monkeypatch):
    install_fake_vllm(monkeypatch)
    world, model = ThreadWorld(1), EchoModel(EOS)
    llm = FakeLLM(model)
    accelerator = FakeAccelerator(world, 0)
    generator = TrainerGenerator(policy(accelerator, make_backend("colocate", accelerator, llm=llm)), RolloutConfig())
    contexts, limits = REQUESTS[1][0]
    with generator:
        answers = generator.generate(contexts, limits)
        assert generator.generate([], []) == []
    assert [a for a in answers] == [model.expected(c, n) for c, n in zip(contexts, limits)]
    assert llm.calls == [[(tuple(c), n) for c, n in zip(contexts, limits)]]  # nothing sent for the empty turn


def answers_of(episode):
    """(start, answer ids, answer logprobs) of every turn: the runs of model tokens in the completion."""
    runs, start = [], None
    for i, mask in enumerate(episode.env_mask + [0]):
        if mask and start is None:
            start = i
        elif not mask and start is not None:
            runs.append((start, episode.completion_ids[start:i], episode.logprobs[start:i]))
            start = None
    return runs


@pytest.mark.parametrize("mode", ["server", "colocate_tp2"])
def test_two_process_rollout_every_answer_lands_on_its_episode(mode, monkeypatch):
    """Rank 0's 3 episodes end after one turn, rank 1's 5 go on for up to 5 turns under a tight token budget (so the
    per-episode limits differ): each answer must be the engine's answer to that episode's own context, cut at that
    episode's own limit, with its logprobs."""
    world = ThreadWorld(2)
    tokenizers = [build_tiny_tokenizer(), build_tiny_tokenizer()]
    model = EchoModel(tokenizers[0].eos_token_id, encode=lambda text: tokenizers[0].encode(text))
    backend_of, _ = two_process_backends(mode, world, model, monkeypatch)
    lengths = {0: [1, 1, 1], 1: [2, 3, 4, 5, 5]}
    config = RolloutConfig(
        max_turns=6, max_turn_tokens=16, max_episode_tokens=150, pool_backend="inline", progress_bar=False
    )

    def play(rank):
        accelerator = FakeAccelerator(world, rank)
        generator = TrainerGenerator(policy(accelerator, backend_of(rank, accelerator), model.eos_token_id), config)
        tasks = [TaskSpec(env="countdown", task=f"t{rank}{i}", variation=n) for i, n in enumerate(lengths[rank])]
        return MultiTurnRollout(CountdownEnv, config).play(tasks, generator, tokenizers[rank])

    batches = world.run(play)
    assert [e.turns for e in batches[0].episodes] == [1, 1, 1]
    assert max(e.turns for e in batches[1].episodes) >= 3  # rank 1 kept generating while rank 0 had nothing live
    cut_by_budget = 0
    for batch in batches:
        for episode in batch.episodes:
            turns = answers_of(episode)
            assert len(turns) == episode.turns
            for start, ids, logprobs in turns:
                context = episode.prompt_ids + episode.completion_ids[:start]
                limit = min(config.max_turn_tokens, config.max_episode_tokens - start)
                assert (ids, logprobs) == model.expected(context, limit), f"{episode.task.task} at {start}"
                cut_by_budget += limit < config.max_turn_tokens
    assert cut_by_budget > 0  # some answers had a limit of their own, below max_turn_tokens


def test_two_process_sleep_mode_syncs_and_sleeps_once_per_rollout(monkeypatch):
    """Colocate, TP = 2, sleep mode: two multi-turn rollouts wake, sync and sleep each engine twice, not per turn."""
    world, engines = ThreadWorld(2), {}
    tokenizers = [build_tiny_tokenizer(), build_tiny_tokenizer()]
    model = EchoModel(tokenizers[0].eos_token_id, encode=lambda text: tokenizers[0].encode(text))
    backend_of, _ = two_process_backends("colocate_tp2", world, model, monkeypatch, sleep=True, engines=engines)
    config = RolloutConfig(max_turns=6, max_turn_tokens=16, pool_backend="inline", progress_bar=False)

    def play(rank):
        accelerator = FakeAccelerator(world, rank)
        generator = TrainerGenerator(policy(accelerator, backend_of(rank, accelerator), model.eos_token_id), config)
        rollout = MultiTurnRollout(CountdownEnv, config)
        tasks = [TaskSpec(env="countdown", task=f"t{rank}{i}", variation=2 + i + rank) for i in range(3)]
        return [rollout.play(tasks, generator, tokenizers[rank]).stats for _ in range(2)]

    stats = world.run(play)
    for rank, llm in engines.items():
        assert len(llm.calls) >= 8  # 2 rollouts of 4-5 turns ...
        assert (llm.syncs, llm.sleeps, llm.prefix_resets) == (2, 1 + 2, 2)  # ... 2 syncs, 2 sleeps (+ init)
        assert [s.weight_syncs for s in stats[rank]] == [1, 1]
