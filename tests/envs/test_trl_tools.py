"""A TRL `environment_factory` class played by our rollout (`trl_epo.envs.trl_tools`): the TextEnv contract, TRL's
tool semantics (typed arguments, errors answered to the model, `reset` text appended to the prompt, `get_reward`),
the tool schemas in every prompt, tool results as the chat template's tool messages (full and windowed contexts),
and one EPO optimizer step with a tiny real model in env worker processes."""

import json

import pytest
from conftest import base_config_kwargs
from helpers.scripted import ScriptedLM
from helpers.tool_envs import GuessEnv, bisecting_policy, guess_rows
from trl.chat_template_utils import qwen2_5_chat_template

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.envs.checker import check_text_env
from trl_epo.envs.trl_tools import TRLEnvironment, make_dataset, task_rows
from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig
from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tool_tokenizer():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = qwen2_5_chat_template  # a chat template with tools (TRL knows its response parser)
    return tokenizer


def tasks(targets):
    columns = task_rows(guess_rows(targets))
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def call(name, **arguments):
    return json.dumps(
        {"content": "", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}
    )


def test_adapter_passes_check_text_env():
    factory = TRLEnvironment(GuessEnv)
    report = check_text_env(factory(), tasks([3])[0], factory=factory)
    assert report.ok and "model_text_is_data" in report.passed and "factory_pickles" in report.passed


def test_tool_semantics_match_trl():
    env = TRLEnvironment(GuessEnv)()
    first = env.reset(tasks([6])[0])
    # reset's string is appended to the last user message of the row's prompt, as TRL does
    assert first.info["prompt_messages"] == [
        {"role": "user", "content": "Find the secret number. The number is between 1 and 8."}
    ]
    step = env.step(call("guess", number=4))
    assert (step.done, step.info["tool_messages"]) == (False, [{"role": "tool", "name": "guess", "content": "higher"}])
    # a method that raises, an unknown tool, bad arguments: TRL's {'error': ...} text goes back to the model
    for action, content in [
        (call("shout", word="x"), "{'error': 'no shouting: x'}"),
        (call("nope"), "{'error': 'Tool nope not found.'}"),
    ]:
        step = env.step(action)
        assert step.info["tool_messages"][0]["content"] == content and step.info["invalid_action"] and not step.done
    assert "unexpected keyword argument" in env.step(call("guess", n=1)).info["tool_messages"][0]["content"]
    won = env.step(call("guess", number=6))  # the env signals completion (`done`): reward from get_reward()
    assert (won.done, won.won, won.reward, won.info["score"]) == (True, True, 1.0, 100.0)
    env.reset(tasks([6])[0])
    final = env.step(json.dumps({"content": "It is 2.", "tool_calls": []}))  # an answer without a tool call ends it
    assert (final.done, final.won, final.reward) == (True, False, 0.0)
    env.close()


def test_schemas_reach_the_prompt_and_parsed_calls_drive_the_env(tool_tokenizer):
    model = ScriptedLM(tool_tokenizer, bisecting_policy)
    for history in (None, 1):
        rollout = MultiTurnRollout(
            TRLEnvironment(GuessEnv),
            RolloutConfig(
                pool_backend="thread", progress_bar=False, max_turns=6, max_episode_tokens=6000, history_turns=history
            ),
        )
        try:
            batch = rollout.play(tasks([7, 2]), ModelGenerator(model, tool_tokenizer), tool_tokenizer)
        finally:
            rollout.close()
        for episode, turns in zip(batch.episodes, (3, 2)):  # 4 -> 6 -> 7 and 4 -> 2
            prompt = tool_tokenizer.decode(episode.prompt_ids)
            assert '"name": "guess"' in prompt and '"name": "shout"' in prompt  # the schemas, via tools=
            assert "Find the secret number. The number is between 1 and 8." in prompt
            assert episode.won and episode.env_error is None and episode.turns == turns
            text = tool_tokenizer.decode(episode.completion_ids)
            assert "<tool_response>\n{'error': 'no shouting: hi'}\n</tool_response>" in text
            assert "<tool_response>\nhigher" in text or "<tool_response>\nlower" in text
            calls = [c["function"] for c in episode.messages[1]["tool_calls"]]  # typed by the schema: "4" -> 4
            assert calls == [
                {"name": "shout", "arguments": {"word": "hi"}},
                {"name": "guess", "arguments": {"number": 4}},
            ]
        assert batch.stats.successes == 2
        if history == 1:  # a windowed prompt: the env's first prompt and only the last exchange
            last_block = tool_tokenizer.decode(batch.episodes[0].context(windowed=True))
            # the last turn's block: the previous exchange (answer 6 -> "higher") and the answer itself, not turn 1's
            assert (
                last_block.count('"name": "guess", "arguments"') == 2
                and '"name": "shout", "arguments"' not in last_block
            )
            assert "Find the secret number." in last_block


def test_epo_trains_one_step_on_a_trl_environment(tool_tokenizer, tmp_path):
    args = EPOConfig(
        **base_config_kwargs(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=2000,
            env_max_turns=2,
            env_max_turn_tokens=8,
            env_history_turns=1,
            env_pool_backend="process",
            temperature=1.0,
        )
    )
    trainer = EPOTrainer(
        build_tiny_model(tool_tokenizer),
        args=args,
        train_dataset=make_dataset(guess_rows([3, 5, 2, 7])),
        eval_dataset=make_dataset(guess_rows([4, 6]), split="iid"),
        processing_class=tool_tokenizer,
        env_factory=TRLEnvironment(GuessEnv),
    )
    try:
        trainer.train()
        evaluated = trainer.evaluate()  # success with its Wilson interval, on the same adapter
    finally:
        trainer.close_envs()
    assert evaluated["eval/iid/episodes"] == 2 and 0 <= evaluated["eval/iid/success_ci_low"] <= 1
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 1 and "epo/entropy" in logged[0] and logged[0]["rollout/env_error_episodes"] == 0
    prompt = tool_tokenizer.decode(trainer.env_rollout.last_batch.episodes[0].prompt_ids)
    assert '"name": "guess"' in prompt
