"""Evaluation during training: `eval_strategy="steps"` plays the eval splits with the policy at
`env_eval_temperature`, logs `eval/<split>/success_rate` with its Wilson interval, records eval_results.json for the
model card, and `trl-epo plot` draws it."""

import json

import pytest
from conftest import base_config_kwargs

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.envs.toy import ToyEnv, make_dataset
from trl_epo.plotting import eval_splits, plot_run
from trl_epo.results import load_eval_results, wilson_interval
from trl_epo.rollout import TrainerGenerator


def test_periodic_evaluation_logs_each_split_with_its_interval(tokenizer, make_model, tmp_path, monkeypatch):
    temperatures = []
    real_generate = TrainerGenerator.generate

    def spy(self, contexts, limits):
        temperatures.append(self.generation_config.temperature)
        return real_generate(self, contexts, limits)

    monkeypatch.setattr(TrainerGenerator, "generate", spy)
    args = EPOConfig(
        **base_config_kwargs(
            tmp_path,
            max_steps=2,
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=300,
            env_max_turns=2,
            env_max_turn_tokens=6,
            env_pool_backend="thread",
            temperature=1.0,
            eval_strategy="steps",
            eval_steps=1,
            env_eval_temperature=0.4,
            env_eval_seeds=[0, 1],
            per_device_eval_batch_size=2,
        )
    )
    evaluation = {"iid": make_dataset("iid", 3), "ood": make_dataset("ood", 2)}
    trainer = EPOTrainer(
        make_model(),
        args=args,
        train_dataset=make_dataset("train", 4),
        eval_dataset=evaluation,
        processing_class=tokenizer,
        env_factory=ToyEnv,
    )
    trainer.train()

    evals = [h for h in trainer.state.log_history if "eval/iid/success_rate" in h]
    assert [h["step"] for h in evals] == [1, 2]
    for h in evals:
        for split, tasks in (("iid", 3), ("ood", 2)):
            n = h[f"eval/{split}/episodes"]
            assert n == tasks * 2  # every task once per seed
            rate = h[f"eval/{split}/success_rate"]
            low, high = wilson_interval(round(rate * n), int(n))
            assert h[f"eval/{split}/success_ci_low"] == pytest.approx(low)
            assert h[f"eval/{split}/success_ci_high"] == pytest.approx(high)
            assert h[f"eval/{split}/mean_turns"] >= 1
    # Training rollouts sampled at temperature 1.0, evaluation at 0.4.
    assert set(temperatures) == {1.0, 0.4}
    # The latest evaluation is what the model card shows.
    saved = {r.split: r for r in load_eval_results(str(tmp_path))}
    assert set(saved) == {"iid", "ood"} and saved["iid"].episodes == 6 and saved["iid"].temperature == 0.4
    assert saved["iid"].extra["settings"]["step"] == 2
    # trl-epo plot draws the eval curves.
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert eval_splits(history) == ["iid", "ood"]
    written = plot_run(str(tmp_path))
    assert (tmp_path / "plots" / "epo_dynamics.png").stat().st_size > 0 and "epo_dynamics" in written


def test_a_single_eval_dataset_is_named_by_its_split_column(tokenizer, make_model, tmp_path):
    args = EPOConfig(
        **base_config_kwargs(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=2,
            num_generations=2,
            max_completion_length=200,
            env_max_turns=1,
            env_max_turn_tokens=4,
            env_pool_backend="inline",
        )
    )
    trainer = EPOTrainer(
        make_model(), args=args, train_dataset=make_dataset("train", 2), processing_class=tokenizer, env_factory=ToyEnv
    )
    metrics = trainer.evaluate(make_dataset("ood", 2))
    assert metrics["eval/ood/episodes"] == 2 and 0 <= metrics["eval/ood/success_rate"] <= 1
    with pytest.raises(ValueError, match="eval_dataset"):
        trainer.evaluate()
