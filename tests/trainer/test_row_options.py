"""TRL's loss options on env rows are functions of the optimizer step, not of its forward chunking: the same gradient
for env_forward_token_budget None / small / 1, or the option is refused with the reason (`trl_epo.row_options`)."""

import pytest
import torch
from conftest import base_config_kwargs, count_a_reward, windowed_config_kwargs

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.envs.toy import ToyEnv, make_dataset


BUDGETS = (None, "small", 1)  # "small": two of the longest rows per chunk


def make_trainer(tokenizer, make_model, tmp_path, **overrides):
    args = EPOConfig(**windowed_config_kwargs(tmp_path, **overrides))
    return EPOTrainer(
        make_model(initializer_range=0.2),
        reward_funcs=count_a_reward,
        args=args,
        train_dataset=make_dataset("train", 4),
        processing_class=tokenizer,
        env_factory=ToyEnv,
    )


def step_gradients(trainer):
    """The gradient of one optimizer step on one played rollout, for every budget, and the chunk counts."""
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._play_rollout_batch([dict(r) for r in make_dataset("train", 2) for _ in range(2)])
    trainer._play_rollout_batch = lambda rows, b=batch: b
    micro = trainer._score_rollout([dict(r) for r in make_dataset("train", 2) for _ in range(2)])
    grads, chunks, losses = {}, {}, {}
    controller = (trainer.entropy_coef, trainer._last_world_entropy)  # TRL's adaptive entropy state
    trainer.coef_after = {}
    small = 2 * max(r.length for r in micro[0].rows)
    for budget in BUDGETS:
        trainer.entropy_coef, trainer._last_world_entropy = controller
        trainer.args.env_forward_token_budget = small if budget == "small" else budget
        trainer.model.zero_grad(set_to_none=True)
        trainer.accelerator.gradient_state._set_sync_gradients(True)
        losses[budget] = trainer._train_micro_batch(trainer.model, micro[0]).item()
        grads[budget] = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        chunks[budget] = len(trainer._chunks(micro[0].rows))
        trainer.coef_after[budget] = trainer.entropy_coef
    trainer.close_envs()
    return grads, chunks, losses, micro[0]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo"])
def test_trls_entropy_bonus_is_the_steps_token_mean_for_any_chunking(tokenizer, make_model, tmp_path, loss_type):
    trainer = make_trainer(
        tokenizer, make_model, tmp_path, loss_type=loss_type, epo_entropy_coef=0.0, entropy_coef=0.1
    )
    grads, chunks, _, _ = step_gradients(trainer)
    assert chunks[None] < chunks["small"] < chunks[1]  # three different cuts of the same step
    for budget in BUDGETS[1:]:
        diff = (grads[budget] - grads[None]).norm() / grads[None].norm()
        assert diff < 1e-5, (budget, diff.item())


def test_the_bonus_alone_is_coef_times_the_steps_mean_entropy(tokenizer, make_model, tmp_path):
    """With every advantage 0 the loss is the bonus: -coef x the token mean of the step's action entropies (it was
    -coef x the sum of the chunks' means, 4-11x too large)."""
    trainer = make_trainer(tokenizer, make_model, tmp_path, epo_entropy_coef=0.0, entropy_coef=0.1)
    trainer.reward_funcs = [lambda completions, **kw: [0.0] * len(completions)]
    trainer.reward_func_names = ["zero"]
    _, _, losses, micro = step_gradients(trainer)
    trainer.args.env_forward_token_budget = None
    with torch.no_grad():
        total, tokens = 0.0, 0
        for chunk in trainer._chunks(micro.rows):
            inputs = trainer._chunk_inputs(chunk, micro.counts)
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            _, entropies, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, att, inputs["completion_ids"].size(1), compute_entropy=True
            )
            mask = inputs["completion_mask"] * inputs["tool_mask"]
            total += (entropies * mask).sum().item()
            tokens += int(mask.sum())
    assert tokens == micro.counts.action_tokens
    for budget in BUDGETS:
        assert losses[budget] == pytest.approx(-0.1 * total / tokens, rel=1e-5)


def test_trls_adaptive_entropy_acts_once_per_step_for_any_chunking(tokenizer, make_model, tmp_path):
    trainer = make_trainer(
        tokenizer,
        make_model,
        tmp_path,
        epo_entropy_coef=0.0,
        use_adaptive_entropy=True,
        entropy_coef=0.05,
        entropy_target=100.0,  # entropy below target: the bonus is on and the coefficient grows each step
        entropy_coef_delta=0.01,
    )
    trainer._last_world_entropy = 0.0  # a previous step below the target: this step applies the bonus
    start = trainer.entropy_coef
    grads, _, _, _ = step_gradients(trainer)
    for budget in BUDGETS[1:]:
        assert (grads[budget] - grads[None]).norm() / grads[None].norm() < 1e-5
    assert trainer.coef_after == pytest.approx({b: start + 0.01 for b in BUDGETS})  # one controller update a step


@pytest.mark.parametrize(
    "setting",
    [
        {"loss_type": "dr_grpo", "importance_sampling_level": "sequence"},
        {"loss_type": "luspo", "importance_sampling_level": "sequence"},
        {"loss_type": "sapo", "off_policy_mask_threshold": 0.5},
        {"loss_type": "cispo", "delta": 1.5},
    ],
    ids=["dr_grpo-sequence", "luspo-sequence", "sapo-off-policy-mask", "cispo-delta"],
)
def test_other_trl_loss_options_are_per_token_or_per_row(tokenizer, make_model, tmp_path, setting):
    """What `trl_epo.row_options` says needs no handling: the same step gradient for any chunking."""
    trainer = make_trainer(tokenizer, make_model, tmp_path, **setting)
    grads, _, _, _ = step_gradients(trainer)
    for budget in BUDGETS[1:]:
        assert (grads[budget] - grads[None]).norm() / grads[None].norm() < 1e-5, budget


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"top_entropy_quantile": 0.5}, "top_entropy_quantile=0.5"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, "normalize_then_sum"),
        ({"mask_truncated_completions": True}, "mask_truncated_completions=True"),
    ],
)
def test_trl_options_env_rows_cannot_apply_per_step_are_refused(tokenizer, make_model, tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tokenizer, make_model, tmp_path, **setting)


def test_a_moe_router_loss_is_refused_on_env_rows(tokenizer, make_model, tmp_path):
    model = make_model(initializer_range=0.2)
    model.config.output_router_logits, model.config.router_aux_loss_coef = True, 0.01  # as a MoE model's config
    with pytest.raises(ValueError, match="router loss"):
        EPOTrainer(
            model,
            args=EPOConfig(**base_config_kwargs(tmp_path, per_device_train_batch_size=2, num_generations=2)),
            train_dataset=make_dataset("train", 2),
            processing_class=tokenizer,
            env_factory=ToyEnv,
        )
