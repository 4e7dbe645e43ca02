"""EPOTrainer on TRL's own entry points: a GRPOConfig as drop-in config, TRL's entropy bonus composed with EPO's,
the env_* settings on TRL's paths (applied or refused with the reason), and Eq. 2 with the optimizer step's global
normalisers on a custom rollout_func (gradient accumulation changes nothing)."""

import logging
import math

import pytest
import torch
from conftest import base_config_kwargs, count_a_reward
from datasets import Dataset
from helpers.tool_calls import hand_eq2
from trl import GRPOConfig

import trl_epo.trainer as trainer_module
from trl_epo import EPOConfig, EPOTrainer
from trl_epo.envs.toy import ToyEnv
from trl_epo.trl_batch import multi_turn_importance_ratio, step_normalisers, step_window, turn_ids_from_mask
from trl_epo.trl_paths import APPLIES, TRL_PATH_SETTINGS, check_trl_path_settings


def test_turn_ids_from_mask_numbers_each_run_of_model_tokens():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 1], [0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert turn_ids_from_mask(mask).tolist() == [
        [0, 0, -1, -1, 1, -1, 2, 2],
        [-1, 0, 0, 0, -1, -1, -1, -1],
        [-1] * 8,
    ]


def test_a_grpo_config_is_converted_with_epo_defaults(make_model, tokenizer, single_turn_dataset, tmp_path, caplog):
    grpo = GRPOConfig(**base_config_kwargs(tmp_path, max_steps=1, learning_rate=3e-3, gradient_accumulation_steps=2))
    caplog.set_level(logging.INFO, logger="trl_epo.trainer")
    trainer = EPOTrainer(
        make_model(),
        reward_funcs=count_a_reward,
        args=grpo,
        train_dataset=single_turn_dataset,
        processing_class=tokenizer,
    )
    args = trainer.args
    assert isinstance(args, EPOConfig)
    defaults = EPOConfig.__dataclass_fields__
    for name in ("epo_entropy_coef", "epo_smoothing", "epo_reference", "env_importance_sampling"):
        assert getattr(args, name) == defaults[name].default
    assert args.learning_rate == 3e-3 and args.gradient_accumulation_steps == 2
    assert (args.steps_per_generation, args.generation_batch_size) == (
        grpo.steps_per_generation,
        grpo.generation_batch_size,
    )
    lines = [r.getMessage() for r in caplog.records if "converted to an EPOConfig" in r.getMessage()]
    assert len(lines) == 1 and "GRPOConfig" in lines[0]
    trainer.train()
    assert "epo/entropy" in trainer.state.log_history[0]


def test_trl_entropy_bonus_adds_to_epo_terms(make_model, tokenizer, single_turn_dataset, tmp_path):
    """TRL's bonus (token mean of the micro-batch / GA) is part of L_base; EPO's terms come on top, unchanged."""
    g = torch.Generator().manual_seed(0)
    inputs = {
        "prompt_ids": torch.randint(3, len(tokenizer), (3, 4), generator=g),
        "prompt_mask": torch.ones(3, 4, dtype=torch.long),
        "completion_ids": torch.randint(3, len(tokenizer), (3, 6), generator=g),
        "completion_mask": torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0]]),
        "advantages": torch.tensor([0.5, -1.0, 0.5]),
    }
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    losses = {}
    for coef in (0.0, 0.3):
        with pytest.warns(UserWarning) if coef else _no_warning():
            args = EPOConfig(**base_config_kwargs(tmp_path, entropy_coef=coef))
        trainer = EPOTrainer(
            make_model(), count_a_reward, args, train_dataset=single_turn_dataset, processing_class=tokenizer
        )
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        captured = {}
        real = trainer._get_per_token_logps_and_entropies

        def spy(*a, **k):
            result = real(*a, **k)
            captured["entropies"] = result[1].detach()
            return result

        trainer._get_per_token_logps_and_entropies = spy
        losses[coef] = trainer.compute_loss(trainer.model, dict(inputs)).item()
    mask = inputs["completion_mask"].float()
    token_mean = (captured["entropies"] * mask).sum() / mask.sum()
    assert losses[0.0] - losses[0.3] == pytest.approx(0.3 * token_mean.item(), rel=1e-4)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- env_* settings on TRL's paths
NON_DEFAULT = {
    "env_max_turns": 4,
    "env_max_turn_tokens": 16,
    "env_history_turns": 2,
    "env_reward": "score",
    "env_invalid_action_penalty": 0.1,
    "env_error_reward": "zero",
    "env_action_tag": "answer",
    "env_instruction": "Act.",
    "env_show_admissible_actions": False,
    "env_max_observation_chars": 100,
    "env_pool_backend": "thread",
    "env_pool_size": 2,
    "env_step_timeout": 5.0,
    "env_reuse_kv_cache": False,
    "env_sample_layout": "packed",
    "env_advantage_baseline": "rows",
    "env_forward_token_budget": 1024,
    "env_packed_mask_limit_gb": 1.0,
    "env_eval_temperature": 0.7,
    "env_eval_seeds": [0, 1],
    "env_updates_per_rollout": 2,
    "env_lr_per_rollout": True,
    "env_importance_sampling": "turn_mask",
    "env_log_episodes": False,
}
REFUSED = [name for name, why in TRL_PATH_SETTINGS.items() if why != APPLIES]


def test_every_setting_of_the_table_is_exercised():
    assert set(NON_DEFAULT) == set(TRL_PATH_SETTINGS)


@pytest.mark.parametrize("name", REFUSED)
def test_a_refused_env_setting_raises_its_reason_on_trl_paths(name, tmp_path):
    extra = {"env_history_turns": 2} if name in ("env_sample_layout", "env_packed_mask_limit_gb") else {}
    args = EPOConfig(**base_config_kwargs(tmp_path, **extra, **{name: NON_DEFAULT[name]}))
    with pytest.raises(ValueError, match=name) as error:
        check_trl_path_settings(args, None, {"tools": [len]})
    assert TRL_PATH_SETTINGS[name].split(";")[0][:40] in str(error.value)
    assert "env_factory=" in str(error.value)


def test_settings_that_apply_on_trl_paths_are_accepted(tmp_path):
    args = EPOConfig(
        **base_config_kwargs(
            tmp_path,
            per_device_train_batch_size=2,
            num_generations=2,
            env_updates_per_rollout=2,
            env_lr_per_rollout=True,
            env_importance_sampling="turn_mask",
            env_log_episodes=False,
            env_forward_token_budget=None,
        )
    )
    check_trl_path_settings(args, None, {})


def test_refusals_reach_the_user_through_the_trainer(make_model, tokenizer, single_turn_dataset, tmp_path):
    args = EPOConfig(**base_config_kwargs(tmp_path, env_max_turns=4))
    with pytest.raises(ValueError, match="max_tool_calling_iterations"):
        EPOTrainer(make_model(), count_a_reward, args, train_dataset=single_turn_dataset, processing_class=tokenizer)


@pytest.mark.parametrize("trl_argument", ["environment_factory", "tools"])
def test_env_factory_with_trl_agent_arguments_is_refused(trl_argument, make_model, tokenizer, tmp_path):
    class Counter:
        def reset(self, **kwargs):
            return None

        def increment(self, step: int) -> int:
            """Increment.

            Args:
                step: by how much.
            """
            return step

    value = Counter if trl_argument == "environment_factory" else [Counter().increment]
    args = EPOConfig(**base_config_kwargs(tmp_path, env_pool_backend="inline"))
    with pytest.raises(ValueError, match=f"either `env_factory=`.*`{trl_argument}=`"):
        EPOTrainer(
            make_model(),
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["x"] * 4}),
            processing_class=tokenizer,
            env_factory=ToyEnv,
            **{trl_argument: value},
        )


# ---- Eq. 2 with the optimizer step's global normalisers on a custom rollout_func
def multi_turn_rollout(with_turn_ids: bool):
    """8 trajectories of 3 turns (3 env tokens, then the answer); trajectories 0 and 1 without any action token."""

    def rollout_func(prompts, trainer):
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "env_mask": [], "traj": []}
        if with_turn_ids:
            out["turn_ids"] = []
        for j, prompt in enumerate(prompts):
            j = int(prompt.split()[-1]) * 2 + len(out["traj"]) % 2  # the trajectory index, whatever the order
            out["prompt_ids"].append([5, 6, 7 + j])
            ids, mask, turns = [], [], []
            for t in range(3):
                ids += [50 + j] * 3 + [100 + j + t] * (2 + j % 3)
                mask += [0] * 3 + [1] * (2 + j % 3)
                turns += [t] * (5 + j % 3)
            out["completion_ids"].append(ids)
            out["env_mask"].append([0] * len(mask) if j in (0, 1) else mask)
            out["traj"].append(j)
            if with_turn_ids:
                out["turn_ids"].append(turns)
        return out

    return rollout_func


def zero_reward(completions, **kwargs):
    return [0.0] * len(completions)  # advantages 0: the gradient is EPO's alone


@pytest.mark.parametrize("with_turn_ids", [True, False])
def test_eq2_is_normalised_over_the_optimizer_step(with_turn_ids, make_model, tokenizer, tmp_path):
    """One optimizer step of 8 trajectories, as 4 accumulated micro-batches of 2 or one micro-batch of 8: the same
    EPO gradient (SGD update), and the logged L_H is Eq. 2 over all 6 trajectories with action tokens (B = 6)."""
    dataset = Dataset.from_dict({"prompt": [f"task {i}" for i in range(4)]})
    updates, logged = {}, {}
    for micro, accumulation in ((2, 4), (8, 1)):
        args = EPOConfig(
            **base_config_kwargs(
                tmp_path / f"{micro}",
                per_device_train_batch_size=micro,
                num_generations=2,
                gradient_accumulation_steps=accumulation,
                max_steps=1,
                max_completion_length=64,
                optim="sgd",
                learning_rate=1.0,
                max_grad_norm=0.0,
                epo_entropy_coef=1.0,
            )
        )
        model = make_model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = EPOTrainer(
            model,
            reward_funcs=zero_reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            rollout_func=multi_turn_rollout(with_turn_ids),
        )
        captured = []
        real = trainer._compute_loss

        def spy(m, inputs):
            captured.append(inputs)
            return real(m, inputs)

        trainer._compute_loss = spy
        entropies = []
        real_terms = trainer_module.epo_regularizer

        def terms_spy(entropy, weights, mask, **kwargs):
            entropies.append(entropy.detach())
            return real_terms(entropy, weights, mask, **kwargs)

        trainer_module.epo_regularizer = terms_spy
        try:
            trainer.train()
        finally:
            trainer_module.epo_regularizer = real_terms
        updates[micro] = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}
        logged[micro] = trainer.state.log_history[0]["epo/entropy"]
        turns = torch.cat([x["turn_ids"] for x in captured])
        mask = torch.cat([x["completion_mask"] * x["tool_mask"] for x in captured])
        model_tokens = mask.bool()  # derived = given on the model's tokens: each answer follows env tokens
        assert torch.equal(turns[model_tokens], turn_ids_from_mask(mask)[model_tokens])
        rows = [
            (h.tolist(), m.tolist())
            for e, x in zip(entropies, captured)
            for h, m in zip(e, x["completion_mask"] * x["tool_mask"])
        ]
        assert len(rows) == 8 and sum(any(m) for _, m in rows) == 6
        assert logged[micro] == pytest.approx(hand_eq2(rows), rel=1e-5)
    assert logged[2] == pytest.approx(logged[8], rel=1e-5)
    for name, delta in updates[8].items():
        torch.testing.assert_close(updates[2][name], delta, rtol=1e-4, atol=1e-7)
    assert any(delta.abs().max() > 1e-5 for delta in updates[8].values())


def test_multi_turn_trl_batches_get_the_env_importance_sampling_mode(tmp_path):
    """A long two-turn episode whose per-token vLLM gap is small: TRL's default (sequence_mask) multiplies the ratios
    of the whole row and masks it; `env_importance_sampling` (token_truncate) keeps every token's own ratio, and
    the turn modes use the turns derived from the tool mask."""
    tokens = 200
    old = torch.zeros(1, tokens)
    sampling = torch.full((1, tokens), -0.02)  # ratio exp(0.02) per token, exp(4) over the row
    tool_mask = torch.ones(1, tokens, dtype=torch.long)
    tool_mask[0, 100:120] = 0  # the tool result between the two turns
    batch = {
        "completion_mask": torch.ones(1, tokens, dtype=torch.long),
        "tool_mask": tool_mask,
        "old_per_token_logps": old,
        "sampling_per_token_logps": sampling,
    }
    token = multi_turn_importance_ratio(batch, EPOConfig(**base_config_kwargs(tmp_path)))
    model_tokens = tool_mask.bool()
    assert torch.allclose(token[model_tokens], torch.full_like(token[model_tokens], math.exp(0.02)))
    turn = multi_turn_importance_ratio(
        batch, EPOConfig(**base_config_kwargs(tmp_path, env_importance_sampling="turn_truncate"))
    )
    assert turn[0, 0].item() == pytest.approx(3.0)  # exp(2) per turn, clipped at TRL's clip_max = 3
    sequence = multi_turn_importance_ratio(
        batch, EPOConfig(**base_config_kwargs(tmp_path, env_importance_sampling="sequence_mask"))
    )
    assert (sequence == 0).all()  # TRL's mode: the whole episode is masked


def test_step_normalisers_when_steps_straddle_generation_batches():
    # steps_per_generation 4, gradient accumulation 3, num_iterations 1: steps {0,1,2}, {3 | 4,5}, {6,7 | 8}, ...
    counts = torch.tensor([[2.0, 10.0], [1.0, 4.0], [2.0, 6.0], [1.0, 3.0]])  # per buffered micro-batch
    assert list(step_window(1, 3, 0, 4)) == [0, 1, 2]
    assert step_normalisers(counts, 1, 3, 0, 4).tolist() == [5.0, 20.0]
    assert list(step_window(3, 3, 0, 4)) == [3]  # the first part of step 1: 1 of its 3 micro-batches
    assert step_normalisers(counts, 3, 3, 0, 4).tolist() == [3.0, 9.0]  # its counts / (1/3)
    assert list(step_window(5, 3, 4, 8)) == [4, 5]  # the rest, from the next generation batch
    assert step_normalisers(counts, 5, 3, 4, 8).tolist() == pytest.approx([4.5, 21.0])  # (2 + 1) / (2/3)


def test_steps_per_generation_not_a_multiple_of_accumulation(make_model, tokenizer, single_turn_dataset, tmp_path):
    """GRPOConfig accepts it (TRL serves micro-batches across generation batches); EPOTrainer trains it on TRL's
    batch, and refuses it only with env_factory (a rollout is consumed in K whole optimizer steps)."""
    kwargs = base_config_kwargs(
        tmp_path, per_device_train_batch_size=2, num_generations=2, steps_per_generation=4, max_steps=2
    )
    trainer = EPOTrainer(
        make_model(),
        count_a_reward,
        GRPOConfig(**kwargs, gradient_accumulation_steps=3),
        train_dataset=single_turn_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    assert [h["epo/entropy"] > 0 for h in trainer.state.log_history if "epo/entropy" in h] == [True, True]
    with pytest.raises(ValueError, match="steps_per_generation.*multiple of gradient_accumulation_steps"):
        EPOTrainer(
            make_model(),
            args=EPOConfig(**kwargs, gradient_accumulation_steps=3, env_pool_backend="inline"),
            train_dataset=single_turn_dataset,
            processing_class=tokenizer,
            env_factory=ToyEnv,
        )
