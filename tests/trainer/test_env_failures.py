"""Env failures are never silent: evaluation logs its failed episodes as a metric, and a run whose every env fails
stops with an error after `env_max_failed_rollouts` such rollouts in a row."""

import pytest
from conftest import base_config_kwargs

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.envs.base import TaskSpec
from trl_epo.envs.toy import ToyEnv, make_dataset


class ResetFailEnv(ToyEnv):
    def reset(self, task):
        raise RuntimeError("injected failure at reset")


class EvenVariationsFailEnv(ToyEnv):
    """Tasks of even variation fail at reset."""

    def reset(self, task):
        if TaskSpec.from_row(task).variation % 2 == 0:
            raise RuntimeError("injected eval failure")
        return super().reset(task)


def make_trainer(tokenizer, make_model, tmp_path, env, **overrides):
    kwargs = dict(
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=64,
        env_max_turns=2,
        env_max_turn_tokens=4,
        env_pool_backend="thread",
        env_log_episodes=False,
    )
    kwargs.update(overrides)
    return EPOTrainer(
        make_model(),
        args=EPOConfig(**base_config_kwargs(tmp_path, **kwargs)),
        train_dataset=make_dataset("train", 4),
        processing_class=tokenizer,
        env_factory=env,
    )


def test_a_run_whose_every_env_fails_stops_with_a_clear_error(tokenizer, make_model, tmp_path):
    trainer = make_trainer(tokenizer, make_model, tmp_path, ResetFailEnv, max_steps=4, env_max_failed_rollouts=2)
    with pytest.raises(RuntimeError, match="last 2 rollouts failed in every episode.*injected failure at reset"):
        trainer.train()
    assert trainer.state.global_step == 1  # the second all-failed rollout (step 2) stops it
    patient = make_trainer(tokenizer, make_model, tmp_path, ResetFailEnv, max_steps=2, env_max_failed_rollouts=None)
    patient.train()  # None: never stops (every failed episode is still counted)
    assert patient.state.global_step == 2
    assert [h["rollout/env_error_episodes"] for h in patient.state.log_history if "loss" in h] == [2.0, 2.0]


def test_env_max_failed_rollouts_is_validated(tmp_path):
    with pytest.raises(ValueError, match="env_max_failed_rollouts"):
        EPOConfig(**base_config_kwargs(tmp_path, env_max_failed_rollouts=0))


def test_evaluation_logs_its_env_errors_as_a_metric(tokenizer, make_model, tmp_path):
    trainer = make_trainer(tokenizer, make_model, tmp_path, EvenVariationsFailEnv, max_steps=1)
    tasks = make_dataset("iid", 6)
    expected = sum(TaskSpec.from_row(row).variation % 2 == 0 for row in tasks)
    assert 0 < expected < len(tasks)
    metrics = trainer.evaluate({"iid": tasks})
    trainer.close_envs()
    assert metrics["eval/iid/env_error_episodes"] == expected
    assert trainer.state.log_history[-1]["eval/iid/env_error_episodes"] == expected
