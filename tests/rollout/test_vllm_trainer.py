"""The trainer's vLLM path end to end on one process, with TRL's real `VLLMGeneration` around a stand-in offline
engine (`helpers.fake_vllm.FakeLLM`, colocate mode) that samples from the training model itself: sampled logprobs
reach the training batch; with sleep mode every rollout (training and periodic evaluation) wakes the engine and
syncs the weights once, keeps the prefix cache across its turns and sleeps once; a context that would exceed the
engine's maximum model length ends its episode as truncated."""

import math

import torch
from conftest import base_config_kwargs
from helpers.fake_vllm import FakeLLM, SamplingModel, install_fake_vllm, make_backend
from trl.distributed import DistributedBackend

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.envs.base import TaskSpec
from trl_epo.envs.toy import ToyEnv, make_dataset
from trl_epo.rollout import ChatSegments, RolloutConfig


def vllm_trainer(tokenizer, model, tmp_path, monkeypatch, *, sleep=False, offset=lambda i: 0.0, llm_kwargs=None, **kw):
    """An EPOTrainer whose vLLM backend (TRL's class, colocate, TP 1) drives a FakeLLM sampling from its own model."""
    install_fake_vllm(monkeypatch)
    settings = dict(
        max_steps=1,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=120,
        env_max_turns=3,
        env_max_turn_tokens=7,
        env_pool_backend="thread",
    )
    settings.update(kw)
    args = EPOConfig(**base_config_kwargs(tmp_path, **settings))
    eval_dataset = make_dataset("iid", 2) if settings.get("eval_strategy") == "steps" else None
    trainer = EPOTrainer(
        model,
        args=args,
        train_dataset=make_dataset("train", 2),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        env_factory=ToyEnv,
    )
    llm = FakeLLM(SamplingModel(trainer.model, tokenizer.eos_token_id, offset), **(llm_kwargs or {}))
    backend = make_backend(
        "colocate",
        trainer.accelerator,
        llm=llm,
        sleep=sleep,
        model=trainer.model,
        dist=DistributedBackend(trainer.accelerator),
    )
    # what GRPOTrainer.__init__ sets with use_vllm=True (vLLM itself cannot be built here)
    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, backend, -1
    return trainer, llm


def test_vllm_logprobs_reach_the_batch_with_per_turn_limits(tokenizer, make_model, tmp_path, monkeypatch):
    trainer, llm = vllm_trainer(tokenizer, make_model(), tmp_path, monkeypatch)
    rows = [dict(r) for r in make_dataset("train", 1)] * 2
    output = trainer._play_rollout_batch(rows).trl_output()

    assert llm.syncs == 1  # weights synced once for the whole multi-turn rollout
    assert len(llm.calls) == 3 and all(limit <= 7 for call in llm.calls for _, limit in call)  # one call per turn
    for ids, mask, logprobs in zip(output["completion_ids"], output["env_mask"], output["logprobs"]):
        assert len(logprobs) == len(ids) == len(mask)
        assert all(lp < 0 and math.isfinite(lp) for lp, m in zip(logprobs, mask) if m == 1)
        assert all(lp == 0.0 for lp, m in zip(logprobs, mask) if m == 0)
    episode = trainer.env_rollout.last_batch.episodes[0]
    with torch.no_grad():
        sequence = torch.tensor([episode.prompt_ids + episode.completion_ids])
        logp = torch.log_softmax(trainer.model(input_ids=sequence).logits[0].float(), -1)
    offset = len(episode.prompt_ids)
    for i, (token, m, lp) in enumerate(zip(episode.completion_ids, episode.env_mask, episode.logprobs)):
        if m == 1:
            assert abs(float(logp[offset + i - 1, token]) - lp) < 1e-4
    trainer.close_envs()


def test_sleep_mode_one_weight_sync_and_one_sleep_per_rollout_eval_included(
    tokenizer, make_model, tmp_path, monkeypatch
):
    """2 training rollouts + 2 evaluations (each over 2 seeds): 4 engine sessions, each syncing once and sleeping
    once, whatever the number of turns; the prefix cache is reset only by the syncs. TRL's `generate` would sleep
    after every turn and re-sync all weights on the next."""
    trainer, llm = vllm_trainer(
        tokenizer,
        make_model(),
        tmp_path,
        monkeypatch,
        sleep=True,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        env_eval_seeds=[0, 1],
        per_device_eval_batch_size=2,
        vllm_importance_sampling_correction=False,  # (tested below)
    )
    assert llm.sleeps == 1  # asleep after initialisation, as TRL leaves it
    trainer.train()
    assert len(llm.calls) > 4  # multi-turn rollouts: many generate calls ...
    assert (llm.syncs, llm.prefix_resets) == (4, 4)  # ... one weight sync (and prefix-cache reset) per rollout
    assert llm.sleeps == 1 + 4 and llm.wakes.count(("kv_cache",)) == 4
    history = trainer.state.log_history
    train = [h["rollout/weight_syncs"] for h in history if "rollout/weight_syncs" in h]
    evals = [h["eval/iid/weight_syncs"] for h in history if "eval/iid/weight_syncs" in h]
    assert train == [1.0, 1.0] and evals == [1.0, 1.0]
    trainer.close_envs()


def test_mismatch_metrics_and_default_importance_sampling(tokenizer, make_model, tmp_path, monkeypatch):
    """vLLM's logprobs sit 0.02 below the trainer's on every other token: the logged per-token gap is 0.01 on average
    (overall and in every turn), and the default per-token correction zeroes nothing."""
    trainer, _ = vllm_trainer(tokenizer, make_model(), tmp_path, monkeypatch, offset=lambda i: -0.02 * (i % 2))
    trainer.train()
    logs = next(h for h in trainer.state.log_history if "vllm/logprob_gap/mean" in h)
    assert trainer.args.env_importance_sampling == "token_truncate"
    assert abs(logs["vllm/logprob_gap/mean"] - 0.01) < 0.004
    per_turn = {k: v for k, v in logs.items() if k.startswith("vllm/logprob_gap/turn/")}
    assert set(per_turn) == {f"vllm/logprob_gap/turn/{t}" for t in range(len(per_turn))} and len(per_turn) >= 2
    assert all(abs(v - 0.01) < 0.01 for v in per_turn.values())
    assert logs["vllm/is_ratio/zero_frac"] == 0.0 and 1.0 <= logs["vllm/is_ratio/mean"] < 1.03
    trainer.close_envs()


def test_context_over_the_engine_limit_ends_the_episode_as_truncated(tokenizer, make_model, tmp_path, monkeypatch):
    """The engine's max_model_len (read from the engine, passed through the rollout policy) leaves room for the
    first turns only: the episodes end as "context_limit" truncations (counted in rollout/truncation_rate) and no
    request ever exceeds the limit. Without the check, vLLM raises on the prompt that no longer fits."""
    trainer, llm = vllm_trainer(
        tokenizer, make_model(), tmp_path, monkeypatch, env_max_turns=10, max_completion_length=4000
    )
    rows = [dict(r) for r in make_dataset("train", 1)] * 2
    config = RolloutConfig.from_args(trainer.args, env="toy")
    first = ToyEnv().reset(TaskSpec.from_row(rows[0]))
    segments = ChatSegments(tokenizer, config.prompt_style.system_messages(), config.chat_template_kwargs)
    prompt = segments.prompt(config.prompt_style.first_messages(first.info["task_description"], first))
    limit = len(prompt) + 30  # room for about one turn
    llm.max_model_len = llm.llm_engine.model_config.max_model_len = limit
    batch = trainer._play_rollout_batch(rows)

    assert all(e.truncated == "context_limit" and not e.won for e in batch.episodes)
    assert all(len(prompt) + max_tokens <= limit for call in llm.calls for prompt, max_tokens in call)
    assert all(e.turns >= 1 for e in batch.episodes) and len(llm.calls) >= 1
    logged = trainer._metrics["train"]
    assert logged["rollout/truncation_rate"][-1] == 1.0 and logged["rollout/context_limit_episodes"][-1] == 2
    trainer.close_envs()


def _state_hash() -> str:
    import hashlib
    import random

    return hashlib.sha1(torch.get_rng_state().numpy().tobytes() + repr(random.getstate()).encode()).hexdigest()


def _record_episodes(monkeypatch):
    from trl_epo import evaluation as evaluation_module

    played, real = [], evaluation_module.episode_record

    def record(episode, eval_seed, index):
        played.append((eval_seed, index, tuple(episode.completion_ids)))
        return real(episode, eval_seed, index)

    monkeypatch.setattr(evaluation_module, "episode_record", record)
    return played


def test_vllm_evaluation_seeds_its_requests_and_training_does_not(tokenizer, make_model, tmp_path, monkeypatch):
    from trl_epo.rollout import vllm as vllm_module

    seeds = []
    real_params = vllm_module.VLLMSession._sampling_params

    def params(self, limit, seed=None):
        seeds.append(seed)
        return real_params(self, limit, seed)

    monkeypatch.setattr(vllm_module.VLLMSession, "_sampling_params", params)
    trainer, llm = vllm_trainer(
        tokenizer, make_model(initializer_range=0.5), tmp_path, monkeypatch, eval_strategy="steps", eval_steps=1
    )
    trainer._play_rollout_batch([dict(r) for r in make_dataset("train", 1)] * 2)
    assert seeds and all(s is None for s in seeds)  # training: vLLM's own (per-process) sampling
    played = _record_episodes(monkeypatch)
    per_eval = []
    for prior in (1, 2):
        seeds.clear()
        torch.manual_seed(prior)
        before = _state_hash()
        trainer.evaluate()
        assert _state_hash() == before
        assert seeds and all(s is not None for s in seeds) and len(set(seeds)) == len(seeds)  # one per request
        per_eval.append((list(seeds), list(played)))
        played.clear()
    assert per_eval[0] == per_eval[1]  # the eval seed fixes the requests' seeds and so the episodes
    trainer.args.env_eval_seeds = [5]
    seeds.clear()
    trainer.evaluate()
    assert not set(seeds) & set(per_eval[0][0])
    trainer._play_rollout_batch([dict(r) for r in make_dataset("train", 1)] * 2)
    assert seeds[-1] is None  # unseeded again after the evaluation
    trainer.close_envs()
