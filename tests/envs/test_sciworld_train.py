"""EPO on real ScienceWorld episodes (JVMs in EnvPool worker processes) with a tiny local model."""

import functools

import helpers.sciworld_required  # noqa: F401  (skips this module without scienceworld or Java)
import psutil  # noqa: E402
import torch  # noqa: E402
from conftest import base_config_kwargs  # noqa: E402

from trl_epo import EPOConfig, EPOTrainer  # noqa: E402
from trl_epo.envs import PromptStyle  # noqa: E402
from trl_epo.envs.sciworld import (  # noqa: E402
    ScienceWorldEnv,
    make_dataset,
)
from trl_epo.rollout import MultiTurnRollout  # noqa: E402


INSTRUCTION = "You are an agent in ScienceWorld. Give one command inside {example}."


def teach_one_command(model, tokenizer, tasks, factory, command="look around", steps=15):
    """A few gradient steps so that the tiny random model answers `<action>command</action>` after ScienceWorld
    prompts of the first two turns (a random model never writes a parsable action, so the env would never be
    stepped). Returns the last loss."""
    style = PromptStyle(instruction=INSTRUCTION)
    answer_text = style.answer_message(command)["content"]
    env = factory()
    contexts = []
    try:
        for spec in tasks:
            first = env.reset(spec)
            second = env.step(command)
            messages = style.first_messages(first.info["task_description"], first)
            contexts.append(messages)
            contexts.append(
                messages
                + [
                    {"role": "assistant", "content": answer_text},
                    {"role": "user", "content": style.observation_text(second)},
                ]
            )
    finally:
        env.close()
    answer = tokenizer(answer_text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        for messages in contexts:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            loss = model(
                input_ids=torch.tensor([ids + answer]), labels=torch.tensor([[-100] * len(ids) + answer])
            ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return loss.item()


def test_epo_trains_two_steps_on_sciworld(tokenizer, make_model, tmp_path, monkeypatch):
    jvm_pids = set()
    original_play = MultiTurnRollout.play

    def play_and_record_jvms(self, *args, **kwargs):
        output = original_play(self, *args, **kwargs)
        for pid in self.pool.worker_pids():
            if pid is not None:
                jvm_pids.update(p.pid for p in psutil.Process(pid).children(recursive=True) if p.name() == "java")
        return output

    monkeypatch.setattr(MultiTurnRollout, "play", play_and_record_jvms)
    args = EPOConfig(
        **base_config_kwargs(
            tmp_path,
            max_steps=2,
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=1024,
            env_max_turns=3,
            env_max_turn_tokens=12,
            env_pool_size=2,
            env_instruction=INSTRUCTION,
        )
    )
    dataset = make_dataset("train", num_tasks=4, seed=0, task_types=["find-living-thing", "boil"])
    # The env's move limit (2 commands) ends episodes before the rollout's (3 turns), so the env reports `done` and
    # both success numbers; short observations keep this test fast.
    factory = functools.partial(ScienceWorldEnv, max_turns=2, show_objects=False, show_action_templates="never")
    model = make_model()
    assert teach_one_command(model, tokenizer, [dataset[i] for i in range(2)], factory) < 0.3
    trainer = EPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer, env_factory=factory)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and trainer.state.global_step == 2
    for log in logs:
        for key in (
            "rollout/success_rate",
            "rollout/mean_turns",
            "rollout/time_env",
            "epo/entropy",
            "epo/entropy_turn/0",
            "rewards/env_reward/mean",
        ):
            assert key in log, key
        assert log["rollout/env_error_episodes"] == 0
    # real commands reached the simulator, and episodes it ended report the paper's success rule too
    assert logs[0]["rollout/invalid_turn_rate"] < 1.0
    assert "rollout/success_rate_paper_rule" in logs[0]
    assert any(not (p.detach() == before[n]).all() for n, p in trainer.model.named_parameters())

    episodes = trainer.env_rollout.last_batch.episodes
    assert len(episodes) == 4 and all(e.task.env == "sciworld" for e in episodes)
    assert all(episodes[i].task == episodes[i + 1].task for i in range(0, 4, 2))  # GRPO groups share the task
    for e in episodes:
        assert e.messages[0]["content"].startswith("You are an agent in ScienceWorld")
        assert e.messages[1]["content"].startswith("Task: Your task is")
        assert e.turns <= 3 and e.env_error is None
        assert not e.won  # looking around solves nothing (the paper's rule may still count it: partial score)

    # the env workers and their JVMs were stopped when training ended
    assert trainer.env_rollout.pool is None
    assert len(jvm_pids) == 2
    assert not [pid for pid in jvm_pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
