"""EPOPPOTrainer on the toy env (tiny models, CPU): the config, the critic it builds, GAE per episode across rows, a
PPO + EPO run training both models, the critic learning, `epo_entropy_coef=0` as plain PPO, and resume."""

import copy
import math

import pytest
import torch
from conftest import base_config_kwargs, windowed_config_kwargs
from trl import GRPOTrainer

from trl_epo import EPOConfig, EPOPPOConfig, EPOPPOTrainer
from trl_epo.envs.toy import ToyEnv, make_dataset
from trl_epo.rows import episode_rows


def ppo_args(tmp_path, **overrides):
    kwargs = dict(
        max_steps=2,
        num_generations=1,
        critic_learning_rate=1e-3,
    )
    kwargs.update(overrides)
    return EPOPPOConfig(**windowed_config_kwargs(tmp_path, **kwargs))


def task_reward(completions, task, **kwargs):
    """Each task's reward is a constant: 1 for open-door tasks, 0 for fetch-coin ones (the task is in the prompt)."""
    return [1.0 if t == "open-door" else 0.0 for t in task]


def make_trainer(model, args, tasks=8, **kwargs):
    kwargs.setdefault("reward_funcs", task_reward)
    cls = kwargs.pop("cls", EPOPPOTrainer)
    return cls(
        model,
        args=args,
        train_dataset=make_dataset("train", tasks),
        processing_class=kwargs.pop("tokenizer"),
        env_factory=ToyEnv,
        **kwargs,
    )


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def step_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_config_allows_one_generation_per_task_and_checks_the_critic_settings(tmp_path):
    args = ppo_args(tmp_path, per_device_train_batch_size=1, env_updates_per_rollout=3)
    assert (args.num_generations, args.per_device_train_batch_size) == (1, 1)
    assert args.generation_batch_size == 3 and args.steps_per_generation == 3  # odd: no group constraint is left
    assert args.critic_lr == 1e-3 and ppo_args(tmp_path, critic_learning_rate=None).critic_lr == args.learning_rate
    with pytest.raises(ValueError, match="at least 2 generations"):  # GRPO still needs its groups
        EPOConfig(**base_config_kwargs(tmp_path, num_generations=1))
    for bad in (
        dict(gamma=1.5),
        dict(lam=-0.1),
        dict(cliprange_value=0.0),
        dict(vf_coef=0.0),
        dict(env_advantage_estimator="gigpo"),  # the critic's GAE gives the advantages
        dict(env_filter_groups=True),  # one episode per task: no group to filter
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ppo_args(tmp_path, **bad)


def test_the_critic_starts_from_the_policy_or_is_the_value_model_given(tokenizer, make_model, tmp_path):
    from transformers import AutoModelForTokenClassification

    policy = make_model()
    trainer = make_trainer(policy, ppo_args(tmp_path), tokenizer=tokenizer)
    critic = trainer.critic.model
    assert critic.config.num_labels == 1 and critic.config.classifier_dropout == 0.0
    for name, value in trainer.model.model.state_dict().items():  # the backbone, copied; a fresh value head
        assert torch.equal(critic.model.state_dict()[name], value), name
    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    from_path = make_trainer(str(tmp_path / "policy"), ppo_args(tmp_path), tokenizer=tokenizer)
    for name, value in from_path.model.model.state_dict().items():
        assert torch.equal(from_path.critic.model.model.state_dict()[name], value), name

    def value_model(labels):
        config = copy.deepcopy(policy.config)
        config.num_labels = labels
        return AutoModelForTokenClassification.from_config(config)

    given = value_model(1)
    assert make_trainer(make_model(), ppo_args(tmp_path), tokenizer=tokenizer, value_model=given).critic.model is given
    with pytest.raises(ValueError, match="num_labels=1"):
        make_trainer(make_model(), ppo_args(tmp_path), tokenizer=tokenizer, value_model=value_model(2))
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    pooled = make_trainer(
        make_model(),
        ppo_args(tmp_path),
        tokenizer=tokenizer,
        value_model=AutoModelForSequenceClassification.from_config(config),
    )
    with pytest.raises(ValueError, match="one value per position"):
        pooled._row_values(episode_rows(0, [1, 2], [5, 6], [1, 1], [0, 0], None, "step"))
    with pytest.raises(ValueError, match="env_factory"):
        EPOPPOTrainer(make_model(), args=ppo_args(tmp_path), train_dataset=make_dataset("train", 4))


def test_advantages_are_gae_per_episode_the_same_in_step_and_packed_rows(tokenizer, make_model, tmp_path):
    trainer = make_trainer(make_model(), ppo_args(tmp_path, whiten_advantages=False), tokenizer=tokenizer)
    batch = trainer._play_rollout_batch([dict(r) for r in make_dataset("train", 4)])
    rewards = torch.tensor([1.0, float("nan"), 0.0, 2.0])  # episode 1: an excluded env failure
    per_layout = {}
    for layout in ("step", "packed"):
        trainer.args.env_sample_layout = layout
        trainer._packed_block_marker = batch.block_marker if layout == "packed" else None
        rows = [
            row
            for i, e in enumerate(batch.episodes)
            for row in episode_rows(i, e.prompt_ids, e.completion_ids, e.env_mask, e.turn_ids, None, layout)
        ]
        trainer._assign_advantages(rows, rewards, batch)
        tokens = {}
        for row in rows:
            for i, m in enumerate(row.env_mask):
                if m:
                    tokens.setdefault(row.episode, []).append(
                        (row.advantage[i], row.extra["old_values"][i], row.extra["value_mask"][i])
                    )
            assert all(a == 0.0 for a, m in zip(row.advantage, row.env_mask) if not m)  # environment tokens
        per_layout[layout] = tokens
    step, packed = per_layout["step"], per_layout["packed"]
    assert step.keys() == packed.keys() == {0, 1, 2, 3} and sum(map(len, step.values())) > 10
    for episode, reward in enumerate(rewards.tolist()):
        for (adv, value, counted), (p_adv, p_value, p_counted) in zip(step[episode], packed[episode]):
            assert value == pytest.approx(p_value, abs=1e-5)  # the critic sees each turn as it was played
            assert adv == pytest.approx(p_adv, abs=1e-5) and counted == p_counted
            if math.isnan(reward):
                assert adv == 0.0 and counted == 0.0  # no reward: no advantage, no value target
            else:
                assert adv == pytest.approx(reward - value, abs=1e-6) and counted == 1.0  # gamma = lam = 1


def test_a_ppo_epo_run_logs_critic_and_epo_metrics_and_trains_both_models(
    tokenizer, make_model, tmp_path, monkeypatch
):
    seen = []
    real = EPOPPOTrainer._chunk_inputs

    def chunk_inputs(self, chunk, counts):
        inputs = real(self, chunk, counts)
        seen.append(inputs["advantages"].dim())
        return inputs

    monkeypatch.setattr(EPOPPOTrainer, "_chunk_inputs", chunk_inputs)
    trainer = make_trainer(make_model(), ppo_args(tmp_path, gradient_accumulation_steps=2), tokenizer=tokenizer)
    policy, critic = params(trainer.model), params(trainer.critic.model)
    trainer.train()
    logs = step_logs(trainer)
    assert len(logs) == 2 and seen and set(seen) == {2}  # per-token advantages reach TRL's loss
    for key in ("critic/value_loss", "critic/explained_variance", "critic/value_mean", "critic/clipfrac"):
        assert all(math.isfinite(log[key]) for log in logs), key
    for key in ("critic/advantage_mean", "critic/return_mean", "critic/grad_norm", "epo/entropy", "epo/step_entropy"):
        assert all(key in log for log in logs), key
    assert "frac_reward_zero_std" not in logs[0]  # no groups
    assert trainer.epo_reference.num_updates == 2
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in policy.items())
    assert any(not torch.equal(v, dict(trainer.critic.model.named_parameters())[k]) for k, v in critic.items())

    from transformers import AutoModelForTokenClassification

    trainer.save_model(str(tmp_path / "final"))
    saved = AutoModelForTokenClassification.from_pretrained(tmp_path / "final" / "critic")
    for name, value in saved.state_dict().items():
        assert torch.equal(value, trainer.critic.model.state_dict()[name]), name
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "EPOPPOTrainer" in card and "L_PPO" in card and "### PPO critic settings" in card and "`vf_coef`" in card


def test_the_critic_learns_task_constant_rewards(tokenizer, make_model, tmp_path):
    """Each task's reward is a fixed number (1 or 0, by the task in the prompt): the critic's values move toward the
    rewards, the value loss falls and the explained variance rises over a few steps."""
    args = ppo_args(tmp_path, per_device_train_batch_size=8, max_steps=8, lr_scheduler_type="constant")
    trainer = make_trainer(make_model(), args, tokenizer=tokenizer)
    trainer.train()
    logs = step_logs(trainer)
    first, last = logs[0], logs[-3:]

    def mean(key):
        return sum(log[key] for log in last) / len(last)

    assert abs(first["critic/value_mean"] - first["critic/return_mean"]) > 0.4  # a fresh head predicts ~0
    assert abs(mean("critic/value_mean") - mean("critic/return_mean")) < 0.15
    assert mean("critic/value_loss") < 0.6 * first["critic/value_loss"]
    assert mean("critic/explained_variance") > first["critic/explained_variance"] + 0.1


def test_zero_entropy_coefficient_is_exactly_plain_ppo(tokenizer, make_model, tmp_path):
    class PlainPPO(EPOPPOTrainer):
        """The PPO path with the EPO code removed: TRL's loss at the rows' global normalisation, nothing else."""

        def _compute_loss(self, model, inputs):
            return GRPOTrainer._compute_loss(self, model, inputs) * inputs["row_loss_scale"]

    common = dict(env_updates_per_rollout=2, per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2)
    runs = {}
    for name, cls, coef in (("epo0", EPOPPOTrainer, 0.0), ("plain", PlainPPO, 0.0), ("epo", EPOPPOTrainer, 5e-2)):
        trainer = make_trainer(
            make_model(), ppo_args(tmp_path / name, epo_entropy_coef=coef, **common), tokenizer=tokenizer, cls=cls
        )
        trainer.train()
        runs[name] = (params(trainer.model), params(trainer.critic.model))
    for which in (0, 1):  # policy, critic: the same parameters after 4 steps (2 rollouts of 2 updates)
        for key, value in runs["plain"][which].items():
            assert torch.equal(runs["epo0"][which][key], value), key
    assert any(not torch.equal(runs["epo"][0][k], v) for k, v in runs["epo0"][0].items())  # EPO's terms do act


def test_resume_restores_policy_critic_both_optimizers_and_the_reference(tokenizer, make_model, tmp_path):
    common = dict(
        env_updates_per_rollout=2,
        per_device_train_batch_size=2,
        max_steps=4,
        save_strategy="steps",
        save_steps=1,
        lr_scheduler_type="linear",
        epo_smoothing_alpha=0.5,
        epo_kappa_high=1.0001,
    )
    straight = make_trainer(make_model(), ppo_args(tmp_path / "straight", **common), tokenizer=tokenizer)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-1"  # inside the first rollout: its rows are resumed too
    assert (checkpoint / "critic" / "optimizer.pt").exists() and (checkpoint / "critic" / "scheduler.json").exists()
    resumed = make_trainer(make_model(seed=1), ppo_args(tmp_path / "resumed", **common), tokenizer=tokenizer)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    keys = ("loss", "grad_norm", "critic/value_loss", "critic/grad_norm", "critic/learning_rate", "epo/entropy")

    def trace(trainer, after=0):
        return [log[k] for log in step_logs(trainer) if log["step"] > after for k in keys]

    assert len(trace(resumed, after=1)) == 3 * len(keys)
    assert trace(resumed, after=1) == pytest.approx(trace(straight, after=1), rel=1e-5, abs=1e-7)
    assert resumed.epo_reference.state_dict()["history"] == pytest.approx(
        straight.epo_reference.state_dict()["history"], rel=1e-6
    )
    for which in ("model", "critic"):
        a = straight.model if which == "model" else straight.critic.model
        b = resumed.model if which == "model" else resumed.critic.model
        for key, value in params(a).items():
            torch.testing.assert_close(params(b)[key], value, rtol=1e-5, atol=1e-6, msg=f"{which}.{key}")

    (checkpoint / "critic" / "scheduler.json").unlink()
    fresh = make_trainer(make_model(), ppo_args(tmp_path / "fresh", **common), tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="critic"):
        fresh.train(resume_from_checkpoint=str(checkpoint))


def test_a_lora_policy_gets_a_lora_critic_on_its_own_frozen_base(tokenizer, make_model, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = make_trainer(
        make_model(), ppo_args(tmp_path, max_steps=1, learning_rate=1e-2), tokenizer=tokenizer, peft_config=config
    )
    critic = trainer.critic.model
    assert hasattr(critic, "peft_config") and critic.peft_config["default"].task_type == "TOKEN_CLS"
    before = params(critic)
    trainable = {k for k, v in critic.named_parameters() if v.requires_grad}
    assert trainable and all("lora_" in k or "score" in k for k in trainable)
    trainer.train()
    after = params(critic)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in trainable)  # the base stays frozen
    assert any(not torch.equal(before[k], after[k]) for k in trainable if "score" in k)
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "critic" / "adapter_model.safetensors").exists()


def test_example_scripts_pick_the_trainer_from_the_flag_or_the_config(tmp_path):
    import os
    import sys

    from trl import ModelConfig, TrlParser

    from trl_epo.trainers import trainer_classes, trainer_name

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert trainer_classes("ppo") == (EPOPPOConfig, EPOPPOTrainer) and trainer_name([]) == "grpo"
    assert trainer_name(["--trainer", "ppo"]) == trainer_name(["--trainer=ppo"]) == "ppo"
    with pytest.raises(ValueError, match="supported"):
        trainer_classes("a2c")
    sys.path.insert(0, os.path.join(repo, "examples"))
    try:
        from train_sciworld import SciWorldTrainArguments
    finally:
        sys.path.pop(0)
    for name, processes in (("sciworld_qwen2.5-7b_ppo.yaml", 4), ("sciworld_ppo_tiny.yaml", 1)):
        argv = ["--config", os.path.join(repo, "examples", "configs", name), "--bf16", "false", "--use_cpu", "true"]
        assert trainer_name(argv) == "ppo"  # `trainer: ppo` in the file
        config_cls, _ = trainer_classes(trainer_name(argv))
        script, args, _ = TrlParser((SciWorldTrainArguments, config_cls, ModelConfig)).parse_args_and_config(argv)
        assert isinstance(args, EPOPPOConfig) and script.trainer == "ppo" and args.num_generations == 1
        # episodes per rollout = per_device_train_batch_size x processes x K x gradient_accumulation_steps
        episodes = args.per_device_train_batch_size * processes * args.env_updates * args.gradient_accumulation_steps
        assert episodes == (128 if processes == 4 else 8)
        assert args.env_sample_layout == "step" and args.gamma == args.lam == 1.0
