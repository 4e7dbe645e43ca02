"""An evaluation owns its randomness: it leaves the training RNG streams exactly as they were (runs with different
seeds keep different streams after an evaluation), and an eval seed fixes its episodes on both backends (HF
`generate`: a forked, seeded torch RNG; vLLM: per-request `SamplingParams(seed=...)`)."""

import hashlib
import random

import torch
from conftest import base_config_kwargs

from trl_epo import EPOConfig, EPOTrainer
from trl_epo import evaluation as evaluation_module
from trl_epo.envs.toy import ToyEnv, make_dataset
from trl_epo.row_training import RowTrainingMixin
from trl_epo.seeding import derive_seed, isolated_rng


def toy_args(tmp_path, **overrides):
    kwargs = dict(
        max_steps=1,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=120,
        env_max_turns=2,
        env_max_turn_tokens=6,
        env_pool_backend="thread",
        temperature=1.0,
        env_eval_seeds=[0],
        per_device_eval_batch_size=2,
    )
    kwargs.update(overrides)
    return EPOConfig(**base_config_kwargs(tmp_path, **kwargs))


def state_hash() -> str:
    return hashlib.sha1(torch.get_rng_state().numpy().tobytes() + repr(random.getstate()).encode()).hexdigest()


def record_episodes(monkeypatch):
    """The generated ids of every evaluation episode, in play order."""
    played = []
    real = evaluation_module.episode_record

    def record(episode, eval_seed, index):
        played.append((eval_seed, index, tuple(episode.completion_ids)))
        return real(episode, eval_seed, index)

    monkeypatch.setattr(evaluation_module, "episode_record", record)
    return played


def test_isolated_rng_restores_the_callers_streams_and_seeds_its_own():
    torch.manual_seed(7)
    random.seed(7)
    before = state_hash()
    with isolated_rng(3):
        inside = (torch.rand(3), random.random())
    assert state_hash() == before
    with isolated_rng(3):
        assert torch.equal(torch.rand(3), inside[0]) and random.random() == inside[1]
    assert derive_seed(0, 1) != derive_seed(0, 2) != derive_seed(1, 1) and derive_seed(0, 1) == derive_seed(0, 1)
    assert 0 <= derive_seed(5, 9) < 2**63


def test_evaluation_leaves_the_training_rng_as_it_was_and_is_fixed_by_its_seed(
    tokenizer, make_model, tmp_path, monkeypatch
):
    trainer = EPOTrainer(
        make_model(initializer_range=0.5),
        args=toy_args(tmp_path),
        train_dataset=make_dataset("train", 2),
        eval_dataset={"iid": make_dataset("iid", 4)},
        processing_class=tokenizer,
        env_factory=ToyEnv,
    )
    played = record_episodes(monkeypatch)
    runs = []
    for prior in (123, 456):
        torch.manual_seed(prior)
        random.seed(prior)
        before = state_hash()
        trainer.evaluate()
        assert state_hash() == before  # the training stream continues where it was
        runs.append(list(played))
        played.clear()
    assert runs[0] == runs[1] and len(runs[0]) == 4  # the same episodes whatever the training state
    trainer.args.env_eval_seeds = [1]
    trainer.evaluate()
    assert [p[2] for p in played] != [p[2] for p in runs[0]]  # another eval seed, other samples
    trainer.close_envs()


def test_runs_with_different_seeds_keep_different_streams_after_evaluations(tokenizer, make_model, tmp_path):
    starts = {}
    real_score = RowTrainingMixin._score_rollout
    for seed in (1, 2):
        seen = starts.setdefault(seed, [])

        def score(self, inputs, seen=seen):
            seen.append(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest())
            return real_score(self, inputs)

        RowTrainingMixin._score_rollout = score
        try:
            args = toy_args(
                tmp_path / str(seed), seed=seed, max_steps=3, eval_strategy="steps", eval_steps=1, learning_rate=1e-6
            )
            trainer = EPOTrainer(
                make_model(initializer_range=0.5),
                args=args,
                train_dataset=make_dataset("train", 4),
                eval_dataset={"iid": make_dataset("iid", 2)},
                processing_class=tokenizer,
                env_factory=ToyEnv,
            )
            trainer.train()
        finally:
            RowTrainingMixin._score_rollout = real_score
    assert len(starts[1]) == len(starts[2]) == 3
    # Before the fix every rollout after an evaluation started from the state the eval seed left behind.
    assert all(a != b for a, b in zip(starts[1], starts[2]))
    assert len(set(starts[1])) == 3
