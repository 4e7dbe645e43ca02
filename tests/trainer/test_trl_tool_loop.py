"""EPOTrainer through TRL's own tool loop (`tools=` and `environment_factory=`): a real tiny model whose tokenizer
carries TRL's Qwen2.5 chat template, steered by a scripted logits processor (`helpers.tool_calls`) to emit valid
tool calls. Turn ids are derived from TRL's tool mask (one turn per assistant message, however many tool calls it
holds); Eq. 2, the per-turn metrics and the per-turn reference equal a hand computation on the captured batch."""

import pytest
import torch
from conftest import base_config_kwargs
from datasets import Dataset
from helpers.tool_calls import hand_eq2, model_runs, steer, tool_call, tool_tokenizer

import trl_epo.trainer as trainer_module
from trl_epo import EPOConfig, EPOTrainer
from trl_epo.tiny import build_tiny_model


def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


ONE_CALL = tool_call("multiply", a=3, b=4)
TWO_CALLS = tool_call("multiply", a=3, b=4) + "\n" + tool_call("multiply", a=2, b=5)


def tools_policy(row, context):
    if "<tool_response>" in context:
        return "It is 12."
    return [ONE_CALL, TWO_CALLS, "No tool."][row % 3]


def length_reward(completions, **kwargs):
    return [float(len(str(c))) for c in completions]


def run(tmp_path, policy, epo_reference="cumulative", max_steps=2, reward_funcs=length_reward, **trainer_kwargs):
    tokenizer = tool_tokenizer()
    model = build_tiny_model(tokenizer)
    steer(model, tokenizer, policy)
    args = EPOConfig(
        **base_config_kwargs(
            tmp_path,
            per_device_train_batch_size=3,
            num_generations=3,
            max_completion_length=256,
            max_steps=max_steps,
            epo_reference=epo_reference,
        )
    )
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 3 times 4?"}]] * 4})
    trainer = EPOTrainer(
        model, reward_funcs, args, train_dataset=dataset, processing_class=tokenizer, **trainer_kwargs
    )
    captured, entropies = [], []
    real_loss, real_terms = trainer._compute_loss, trainer_module.epo_regularizer

    def loss_spy(m, inputs):
        captured.append({k: v for k, v in inputs.items() if torch.is_tensor(v)})
        return real_loss(m, inputs)

    def terms_spy(entropy, weights, mask, **kwargs):
        entropies.append(entropy.detach())
        return real_terms(entropy, weights, mask, **kwargs)

    trainer._compute_loss = loss_spy
    trainer_module.epo_regularizer = terms_spy
    try:
        trainer.train()
    finally:
        trainer_module.epo_regularizer = real_terms
    return trainer, tokenizer, captured, entropies


def step_rows(batch, entropy):
    mask = (batch["completion_mask"] * batch["tool_mask"]).tolist()
    return [(h, m) for h, m in zip(entropy.tolist(), mask)]


def hand_turn_means(rows):
    sums, counts = {}, {}
    for h, m in rows:
        for t, run in enumerate(model_runs(m)):
            sums[t] = sums.get(t, 0.0) + sum(h[i] for i in run)
            counts[t] = counts.get(t, 0) + len(run)
    return {t: sums[t] / counts[t] for t in sums}


@pytest.mark.slow  # ~20-50 s on 2 loaded cores: two rollouts through TRL's tool loop
def test_tools_loop_turns_eq2_and_per_turn_reference_by_hand(tmp_path):
    trainer, tokenizer, captured, entropies = run(tmp_path, tools_policy, epo_reference="per_turn", tools=[multiply])
    assert len(captured) == 2
    for batch in captured:
        mask = batch["completion_mask"] * batch["tool_mask"]
        seen = set()
        for r in range(mask.size(0)):
            runs = model_runs(mask[r].tolist())
            assert [set(batch["turn_ids"][r, run].tolist()) for run in runs] == [{t} for t in range(len(runs))]
            assert (batch["turn_ids"][r][mask[r] == 0] == -1).all()
            texts = [tokenizer.decode(batch["completion_ids"][r, run]) for run in runs]
            seen.add(texts[0])
            if texts[0] == "No tool.<|im_end|>":
                assert len(runs) == 1
            else:  # one assistant message with one or two tool calls = one turn; then the answer after the results
                assert texts[0] in (ONE_CALL + "<|im_end|>", TWO_CALLS + "<|im_end|>")
                assert texts[1:] == ["It is 12.<|im_end|>"]
        assert seen == {ONE_CALL + "<|im_end|>", TWO_CALLS + "<|im_end|>", "No tool.<|im_end|>"}
    logs = [h for h in trainer.state.log_history if "epo/entropy" in h]
    turn_means = []
    for log, batch, entropy in zip(logs, captured, entropies):
        rows = step_rows(batch, entropy)
        assert log["epo/entropy"] == pytest.approx(hand_eq2(rows), rel=1e-5)
        means = hand_turn_means(rows)
        assert set(means) == {0, 1}
        for t, value in means.items():
            assert log[f"epo/entropy_turn/{t}"] == pytest.approx(value, rel=1e-5)
        turn_means.append(means)
    for t in (0, 1):  # the per-turn reference: the mean of the previous steps' turn-t entropies
        assert trainer.epo_reference.turn_value(t) == pytest.approx(sum(m[t] for m in turn_means) / 2, rel=1e-5)
    assert logs[1]["epo/reference"] == pytest.approx(trainer.epo_reference.history[0], rel=1e-6)


class Counter:
    """A TRL environment class: `reset(**row)`, one public method (a tool), `get_reward()`."""

    def reset(self, **kwargs):
        self.value = 0

    def increment(self, step: int) -> int:
        """
        Increment the counter.

        Args:
            step: Value to add.

        Returns:
            The counter.
        """
        self.value += step
        return self.value

    def get_reward(self) -> float:
        return float(self.value)


def counter_policy(row, context):
    calls = context.count("<tool_response>")
    if calls == 0:
        return "Done." if row == 2 else tool_call("increment", step=2)
    return tool_call("increment", step=1) if calls == 1 else "Done."


def test_environment_factory_loop_three_turns_by_hand(tmp_path):
    trainer, tokenizer, captured, entropies = run(
        tmp_path, counter_policy, max_steps=1, environment_factory=Counter, reward_funcs=None
    )
    (batch,) = captured
    mask = batch["completion_mask"] * batch["tool_mask"]
    turns = sorted(len(model_runs(mask[r].tolist())) for r in range(mask.size(0)))
    assert turns == [1, 3, 3]
    assert sorted(env.value for env in trainer.environments) == [0, 3, 3]
    for r in range(mask.size(0)):
        runs = model_runs(mask[r].tolist())
        assert [set(batch["turn_ids"][r, run].tolist()) for run in runs] == [{t} for t in range(len(runs))]
    rows = step_rows(batch, entropies[0])
    log = next(h for h in trainer.state.log_history if "epo/entropy" in h)
    assert log["epo/entropy"] == pytest.approx(hand_eq2(rows), rel=1e-5)
    for t, value in hand_turn_means(rows).items():
        assert log[f"epo/entropy_turn/{t}"] == pytest.approx(value, rel=1e-5)
