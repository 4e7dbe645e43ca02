"""EPOTrainer's loss on hand-built batches: GRPO parity, entropy-gradient parity with a naive fp32 softmax (plain and
PEFT LoRA), the corridor gradient through the real model, and multi-turn inputs (turn ids + env mask)."""

import math

import pytest
import torch
from conftest import base_config_kwargs, count_a_reward
from trl import GRPOConfig, GRPOTrainer

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.objective import corridor_penalty, trajectory_weights


def make_trainer(cls, config_cls, model, tokenizer, dataset, tmp_path, peft_config=None, **overrides):
    args = config_cls(**base_config_kwargs(tmp_path, **overrides))
    trainer = cls(
        model,
        reward_funcs=count_a_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    trainer.model.train()
    return trainer


def loss_inputs(vocab_size, batch=4, prompt_len=5, completion_len=10, seed=0, multi_turn=False):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab_size, (batch, prompt_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(3, vocab_size, (batch, completion_len), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 7:] = 0  # right padding
    completion_mask[2, 4:] = 0
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(batch, generator=g),
    }
    if multi_turn:
        # Row 0: turn 0 (3 tokens), env (2), turn 1 (2), env (1), turn 2 (2). Row 1: one turn. Row 2: two turns.
        tool_mask = torch.ones_like(completion_ids)
        tool_mask[0, 3:5] = 0
        tool_mask[0, 7] = 0
        tool_mask[2, 1] = 0
        turn_ids = torch.full_like(completion_ids, -1)
        turn_ids[0] = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
        turn_ids[1, :7] = 0
        turn_ids[2, :4] = torch.tensor([0, 0, 1, 1])
        turn_ids[3] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])  # ten one-token turns
        inputs["tool_mask"] = tool_mask
        inputs["turn_ids"] = turn_ids
    mask = completion_mask * inputs.get("tool_mask", 1)
    inputs["num_items_in_batch"] = mask.sum()
    return inputs


def naive_entropies(model, inputs, temperature):
    """Entropy of softmax(logits / T) in fp32 from the plain forward (no fused head), with autograd."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    c = inputs["completion_ids"].size(1)
    logits = logits[:, -c - 1 : -1].float() / temperature
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_zero_coef_equals_grpo_trainer(make_model, tokenizer, single_turn_dataset, tmp_path, loss_type):
    common = dict(loss_type=loss_type, gradient_accumulation_steps=2)
    grpo = make_trainer(GRPOTrainer, GRPOConfig, make_model(), tokenizer, single_turn_dataset, tmp_path, **common)
    epo = make_trainer(
        EPOTrainer, EPOConfig, make_model(), tokenizer, single_turn_dataset, tmp_path, epo_entropy_coef=0.0, **common
    )
    inputs = loss_inputs(len(tokenizer))
    loss_g, grads_g = loss_and_grads(grpo, inputs)
    loss_e, grads_e = loss_and_grads(epo, inputs)
    assert abs(loss_g.item() - loss_e.item()) <= 1e-6
    assert grads_g.keys() == grads_e.keys() and len(grads_g) > 0
    for name in grads_g:
        torch.testing.assert_close(grads_e[name], grads_g[name], rtol=0, atol=1e-6, msg=name)


def test_epo_loss_is_grpo_loss_plus_regularizer(make_model, tokenizer, single_turn_dataset, tmp_path):
    """Multi-turn inputs: EPO loss - GRPO loss = (-lambda L_H + lambda beta L_smooth) / GA, with L_H the Eq. 2
    aggregation of naive fp32 entropies over model tokens only."""
    lam, ga, alpha = 0.05, 2, 0.1
    common = dict(gradient_accumulation_steps=ga, temperature=0.8)
    grpo = make_trainer(GRPOTrainer, GRPOConfig, make_model(), tokenizer, single_turn_dataset, tmp_path, **common)
    epo = make_trainer(
        EPOTrainer,
        EPOConfig,
        make_model(),
        tokenizer,
        single_turn_dataset,
        tmp_path,
        epo_entropy_coef=lam,
        epo_smoothing_alpha=alpha,
        epo_kappa_low=0.999,
        epo_kappa_high=1.0005,
        **common,
    )
    inputs = loss_inputs(len(tokenizer), multi_turn=True)
    mask = inputs["completion_mask"] * inputs["tool_mask"]
    with torch.no_grad():
        h = naive_entropies(epo.model, inputs, temperature=0.8)
        ref_value = (h * mask).sum().item() / mask.sum().item()
    from trl_epo.objective import StepEntropy

    epo.epo_reference.update(StepEntropy(mean=ref_value, turn_means={}))
    epo.state.global_step, epo.state.max_steps = 3, 10
    beta = 1 + math.exp(-3.0 * 3 / 5)
    weights = trajectory_weights(mask, inputs["turn_ids"])
    l_h = (weights * h).sum().item()
    l_smooth = alpha * (weights * corridor_penalty(h, ref_value, 0.999, 1.0005)).sum().item()
    assert l_smooth > 0  # the corridor is narrow: the penalty is active
    expected = (-lam * l_h + lam * beta * l_smooth) / ga
    with torch.no_grad():
        diff = epo.compute_loss(epo.model, dict(inputs)) - grpo.compute_loss(grpo.model, dict(inputs))
    assert diff.item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    logged = epo._metrics["train"]
    assert logged["epo/entropy"][-1] == pytest.approx(l_h, rel=1e-4)
    assert logged["epo/beta"][-1] == pytest.approx(beta)
    assert logged["epo/reference"][-1] == pytest.approx(ref_value)
    assert 0 < logged["epo/out_of_corridor_frac"][-1] <= 1


def _entropy_gradient_parity(trainer, inputs, temperature, param_filter):
    """The trainer's gradient of -lambda*L_H (zero advantages: the policy term has no gradient) vs naive fp32."""
    inputs = dict(inputs, advantages=torch.zeros_like(inputs["advantages"]))
    loss, grads = loss_and_grads(trainer, inputs)
    lam = trainer.args.epo_entropy_coef
    model = trainer.model
    model.zero_grad(set_to_none=True)
    mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
    h = naive_entropies(model, inputs, temperature)
    naive_loss = -lam * (trajectory_weights(mask, inputs.get("turn_ids")) * h).sum()
    naive_loss.backward()
    checked = 0
    for name, param in model.named_parameters():
        if param.grad is None or not param_filter(name):
            continue
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-4, msg=name)
        checked += 1
    assert loss.item() == pytest.approx(naive_loss.item(), rel=1e-4)
    return checked


@pytest.mark.parametrize("multi_turn", [False, True])
def test_entropy_gradient_matches_naive_softmax(make_model, tokenizer, single_turn_dataset, tmp_path, multi_turn):
    trainer = make_trainer(
        EPOTrainer,
        EPOConfig,
        make_model(initializer_range=0.5),
        tokenizer,
        single_turn_dataset,
        tmp_path,
        epo_entropy_coef=1.0,
        epo_smoothing="none",
        temperature=0.7,
    )
    checked = _entropy_gradient_parity(
        trainer, loss_inputs(len(tokenizer), multi_turn=multi_turn), 0.7, lambda n: True
    )
    assert checked >= 10


def test_entropy_gradient_matches_naive_softmax_with_peft_lora(make_model, tokenizer, single_turn_dataset, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = make_trainer(
        EPOTrainer,
        EPOConfig,
        make_model(initializer_range=0.5),
        tokenizer,
        single_turn_dataset,
        tmp_path,
        peft_config=lora,
        epo_entropy_coef=1.0,
        epo_smoothing="none",
        temperature=0.7,
    )
    checked = _entropy_gradient_parity(
        trainer, loss_inputs(len(tokenizer), multi_turn=True), 0.7, lambda n: "lora_" in n
    )
    assert checked == 2 * 2 * 2  # (A, B) x (q, v) x 2 layers


def _capture_entropies(trainer):
    """Wrap the trainer's entropy source so the test can read the gradient that reaches the entropies."""
    captured = {}
    original = trainer._get_per_token_logps_and_entropies

    def wrapped(*args, **kwargs):
        logps, entropies, aux = original(*args, **kwargs)
        if entropies is not None and entropies.requires_grad:
            entropies.retain_grad()
            captured["entropies"] = entropies
        return logps, entropies, aux

    trainer._get_per_token_logps_and_entropies = wrapped
    return captured


@pytest.mark.parametrize("smoothing", ["hinge", "none"])
def test_corridor_gradient_through_the_trainer(make_model, tokenizer, single_turn_dataset, tmp_path, smoothing):
    """dLoss/dH per unit of aggregation weight = lambda * (-1 + beta * alpha * {-1, 0, +1}) / GA."""
    lam, alpha, ga = 0.5, 0.2, 2
    trainer = make_trainer(
        EPOTrainer,
        EPOConfig,
        make_model(initializer_range=0.5),
        tokenizer,
        single_turn_dataset,
        tmp_path,
        epo_entropy_coef=lam,
        epo_smoothing_alpha=alpha,
        epo_smoothing=smoothing,
        epo_kappa_low=0.75,
        epo_kappa_high=1.25,
        gradient_accumulation_steps=ga,
    )
    from trl_epo.objective import StepEntropy

    inputs = loss_inputs(len(tokenizer), multi_turn=True)
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])
    mask = inputs["completion_mask"] * inputs["tool_mask"]
    with torch.no_grad():
        h = naive_entropies(trainer.model, inputs, 1.0)
    ref_value = float(h[mask.bool()].median())
    trainer.epo_reference.update(StepEntropy(mean=ref_value, turn_means={}))
    trainer.state.global_step, trainer.state.max_steps = 0, 4
    beta = 2.0
    captured = _capture_entropies(trainer)
    trainer.compute_loss(trainer.model, dict(inputs)).backward()
    entropies = captured["entropies"]
    weights = trajectory_weights(mask, inputs["turn_ids"])
    side = torch.zeros_like(entropies)
    side[entropies.detach() < 0.75 * ref_value] = -1.0
    side[entropies.detach() > 1.25 * ref_value] = 1.0
    counted = mask.bool()
    assert {-1.0, 0.0, 1.0} <= set(side[counted].tolist())  # tokens below, inside and above the corridor
    per_unit = entropies.grad[counted] / weights[counted]
    corridor = beta * alpha * side[counted] if smoothing == "hinge" else torch.zeros_like(side[counted])
    torch.testing.assert_close(per_unit, lam * (-1.0 + corridor) / ga, rtol=1e-5, atol=1e-6)
    assert torch.all(entropies.grad[~counted] == 0)


def test_corridor_gradient_matches_finite_differences_on_parameters(
    make_model, tokenizer, single_turn_dataset, tmp_path
):
    """alpha * aggregated hinge penalty as a function of the model parameters: autograd directional derivative ==
    central finite differences (float64 model)."""
    alpha = 0.3
    trainer = make_trainer(
        EPOTrainer,
        EPOConfig,
        make_model(initializer_range=0.5).double(),
        tokenizer,
        single_turn_dataset,
        tmp_path,
        epo_entropy_coef=1.0,
        epo_smoothing_alpha=alpha,
    )
    model = trainer.model
    inputs = loss_inputs(len(tokenizer), multi_turn=True)
    mask = inputs["completion_mask"] * inputs["tool_mask"]
    weights = trajectory_weights(mask, inputs["turn_ids"])
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    c = inputs["completion_ids"].size(1)

    def entropies():
        _, h, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention, c, compute_entropy=True)
        return h

    with torch.no_grad():
        h0 = entropies()[mask.bool()].sort().values
    # Corridor edges half-way between neighbouring entropies: tokens on both sides, none near a kink.
    n = h0.numel()
    low, high = float(h0[n // 4 - 1] + h0[n // 4]) / 2, float(h0[3 * n // 4 - 1] + h0[3 * n // 4]) / 2
    reference, kappa_low, kappa_high = 1.0, low, high

    def smooth_loss():
        return alpha * (weights * corridor_penalty(entropies(), reference, kappa_low, kappa_high)).sum()

    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    model.zero_grad(set_to_none=True)
    smooth_loss().backward()
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    eps = 1e-4
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        plus = smooth_loss().item()
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        minus = smooth_loss().item()
        for p, d in zip(params, direction):
            p.add_(eps * d)
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=2e-2)
