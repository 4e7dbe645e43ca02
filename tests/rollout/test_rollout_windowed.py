"""Windowed contexts (the paper's history of the last k steps): per-turn prompts, packed training rows, and a
training forward that scores every answer on exactly the context it was generated from."""

import torch
from conftest import base_config_kwargs
from helpers.scripted import ScriptedLM
from test_rollout import runs, toy_oracle

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.envs.toy import ToyEnv, make_dataset, make_tasks
from trl_epo.packing import block_position_ids
from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig, find_sublist


class ContextRecorder(ModelGenerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.contexts = []

    def generate(self, contexts, limits):
        self.contexts.append([list(c) for c in contexts])
        return super().generate(contexts, limits)


def play_windowed(tokenizer, model, tasks, k, **config):
    rollout = MultiTurnRollout(
        ToyEnv,
        RolloutConfig(pool_backend="thread", progress_bar=False, history_turns=k, max_episode_tokens=8000, **config),
    )
    generator = ContextRecorder(model, tokenizer)
    try:
        batch = rollout.play(tasks, generator, tokenizer)
        episodes, stats = batch.episodes, batch.stats
    finally:
        rollout.close()
    return batch, episodes, stats, generator


def test_windowed_prompts_and_packed_rows(tokenizer):
    tasks = make_tasks("train", 3)
    batch, episodes, stats, generator = play_windowed(
        tokenizer, ScriptedLM(tokenizer, toy_oracle), tasks, k=2, max_turns=12, max_turn_tokens=40
    )
    assert all(e.won for e in episodes)
    marker = batch.block_marker
    assert len(marker) >= 4
    for i, e in enumerate(episodes):
        # Turn t was generated from block t of the row: the prompt for t = 0, then the env block before answer t.
        blocks = [e.prompt_ids] + [e.completion_ids[s:t] for value, s, t in runs(e.env_mask) if value == 0]
        contexts_of_e = []
        for call_index, call in enumerate(generator.contexts):
            alive = [ep for ep in episodes if ep.turns > call_index]
            if e in alive:
                contexts_of_e.append(call[alive.index(e)])
        assert contexts_of_e == blocks
        assert len(blocks) == e.turns
        for t, block in enumerate(blocks):
            assert find_sublist(block, marker) == 0  # every block is a fresh prompt
            text = tokenizer.decode(block)
            shown = e.history[max(0, t - 2) : t]  # the last k = 2 (observation, action) pairs
            assert text.count("Your action:") == len(shown)
            for _, action in shown:
                assert f"Your action: {action}" in text
        # Answers are the model tokens, each followed by the next block (or the end of the row).
        assert [e.turn_ids[s] for v, s, t in runs(e.env_mask) if v == 1] == list(range(e.turns))
    # Contexts stay bounded: the last block is no longer than the first by more than k steps of history.
    longest = max(len(c) for call in generator.contexts for c in call)
    assert longest < 2.5 * max(len(e.prompt_ids) for e in episodes)


def test_block_position_ids():
    marker = [7, 8]
    ids = torch.tensor([[0, 0, 7, 8, 5, 5, 7, 8, 6, 0], [7, 8, 1, 2, 3, 7, 8, 4, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]])
    positions = block_position_ids(ids, mask, marker)
    assert positions.tolist() == [[0, 1, 0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]


def test_packed_forward_scores_each_answer_on_its_own_context(tokenizer, make_model, tmp_path):
    args = EPOConfig(**base_config_kwargs(tmp_path, env_history_turns=1, temperature=0.9))
    model = make_model(initializer_range=0.5)
    trainer = EPOTrainer(
        model, args=args, train_dataset=make_dataset("train", 4), processing_class=tokenizer, env_factory=ToyEnv
    )
    tasks = make_tasks("train", 2)
    batch, episodes, _, _ = play_windowed(tokenizer, trainer.model, tasks, k=1, max_turns=4, max_turn_tokens=6)
    trainer._packed_block_marker = batch.block_marker
    # A left-padded batch of the two packed rows, as TRL builds it.
    width_p = max(len(e.prompt_ids) for e in episodes)
    width_c = max(len(e.completion_ids) for e in episodes)
    pad = tokenizer.pad_token_id
    prompt = torch.tensor([[pad] * (width_p - len(e.prompt_ids)) + e.prompt_ids for e in episodes])
    prompt_mask = torch.tensor([[0] * (width_p - len(e.prompt_ids)) + [1] * len(e.prompt_ids) for e in episodes])
    completion = torch.tensor([e.completion_ids + [pad] * (width_c - len(e.completion_ids)) for e in episodes])
    completion_mask = torch.tensor(
        [[1] * len(e.completion_ids) + [0] * (width_c - len(e.completion_ids)) for e in episodes]
    )
    with torch.no_grad():
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([prompt, completion], 1),
            torch.cat([prompt_mask, completion_mask], 1),
            width_c,
            compute_entropy=True,
        )
    checked = 0
    for row, e in enumerate(episodes):
        blocks = [e.prompt_ids] + [e.completion_ids[s:t] for v, s, t in runs(e.env_mask) if v == 0]
        answers = [(s, t) for v, s, t in runs(e.env_mask) if v == 1]
        for block, (s, t) in zip(blocks, answers):
            sequence = torch.tensor([block + e.completion_ids[s:t]])
            with torch.no_grad():
                logits = trainer.model(input_ids=sequence).logits[0].float() / 0.9
            reference = torch.log_softmax(logits, -1)
            for j in range(s, t):
                position = len(block) + (j - s) - 1
                expected = reference[position, e.completion_ids[j]].item()
                assert abs(logps[row, j].item() - expected) < 1e-4
                h = -(reference[position].exp() * reference[position]).sum().item()
                assert abs(entropies[row, j].item() - h) < 1e-4
                checked += 1
    assert checked > 10


def test_epo_trainer_trains_with_windowed_contexts(tokenizer, make_model, tmp_path):
    args = EPOConfig(
        **base_config_kwargs(
            tmp_path,
            max_steps=2,
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=600,
            env_max_turns=3,
            env_max_turn_tokens=10,
            env_pool_backend="thread",
            env_history_turns=2,
        )
    )
    trainer = EPOTrainer(
        make_model(), args=args, train_dataset=make_dataset("train", 8), processing_class=tokenizer, env_factory=ToyEnv
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    assert "epo/entropy_turn/2" in logs[-1]
    # Windowed episodes train one row per turn by default (env_sample_layout="step"): no packed rows.
    assert trainer._packed_block_marker is None
    assert logs[-1]["rollout/rows"] == sum(e.turns for e in trainer.env_rollout.last_batch.episodes)
