"""TRL environment classes (`GRPOTrainer(environment_factory=...)`) played by `trl_epo`'s own multi-turn rollout.

A TRL 1.16 environment is a class whose instances have `reset(**row)` (called with the dataset row; a returned
string is appended to the last user message of the row's `prompt`), public methods that are the model's tools, and
optionally `get_reward()` (the episode's reward, read once the episode is over). `TRLEnvironment(MyEnv)` turns it into
a picklable `TextEnv` factory for `EPOTrainer(env_factory=...)`, so the environment gets one training row per turn
with a history window, K optimizer steps per rollout, parallel env workers with timeouts and success evaluation with
Wilson intervals:

    from trl_epo.envs.trl_tools import TRLEnvironment, make_dataset

    trainer = EPOTrainer(model, args=args, train_dataset=make_dataset(rows), processing_class=tokenizer,
                         env_factory=TRLEnvironment(MyEnv))

What each turn does, matching TRL's tool loop (`GRPOTrainer._tool_call_loop`):

* the tool schemas (transformers' `get_json_schema` of each public method) reach every prompt through the chat
  template's `tools=`; the model's answer is parsed the way the chat template defines tool calls
  (`trl_epo.rollout.tool_calls`, TRL's `parse_response`), arguments typed by the schemas;
* each call invokes its method with those keyword arguments; the result, `str(result)`, becomes a tool message
  ``{"role": "tool", "name": ..., "content": ...}``; a method that raises, an unknown tool or a call of another type
  answers ``{'error': '...'}`` to the model, as TRL does (and marks the step `invalid_action`);
* the episode ends when the model answers without a tool call (TRL's rule; a malformed call is such an answer), or
  when, after a tool call, the environment instance has a truthy public attribute `done` (our choice: TRL has no
  completion signal, and an environment that knows the task is over should not wait for the model to stop calling);
  then the reward is `get_reward()` (0.0 without one): `info["score"]` = 100 x reward (`env_reward="score"`
  trains on the reward itself) and `won` = reward >= `success_reward` (`env_reward="success"`, the default).

As in TRL, one instance is constructed per env slot and reset for every episode.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from .base import StepResult, TaskSpec


ENV_NAME = "trl_environment"
_NOT_TOOLS = ("reset", "get_reward")


def tool_methods(instance: Any) -> dict[str, Callable]:
    """The tools of a TRL environment instance, by name: its public functions other than `reset` / `get_reward`
    (listed on the class, as TRL does, so that properties are not evaluated)."""
    return {
        name: getattr(instance, name)
        for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
        if name not in _NOT_TOOLS and not name.startswith("_")
    }


class TRLToolEnv:
    """A TRL environment instance as a `TextEnv` (see the module docstring). Build it with `TRLEnvironment`."""

    def __init__(self, environment_factory: Callable[[], Any], success_reward: float = 1.0):
        self.environment_factory = environment_factory
        self.success_reward = success_reward
        self.environment = None
        self._tools: dict[str, Callable] = {}

    def reset(self, task: TaskSpec | Mapping[str, Any]) -> StepResult:
        row = dataset_row(task)
        if self.environment is None:
            self.environment = self.environment_factory()
            if not callable(getattr(self.environment, "reset", None)):
                raise TypeError(f"{type(self.environment).__name__} has no `reset(**row)` method (TRL needs one too).")
            self._tools = tool_methods(self.environment)
        observation = self.environment.reset(**row)
        prompt = [dict(m) for m in row.get("prompt") or [{"role": "user", "content": ""}]]
        if isinstance(observation, str):  # TRL appends it to the last message (no separator)
            prompt[-1]["content"] = (prompt[-1].get("content") or "") + observation
        text = prompt[-1].get("content") or ""
        return StepResult(observation=text, info={"prompt_messages": prompt, "task_description": ""})

    def step(self, action: str) -> StepResult:
        if self.environment is None:
            raise RuntimeError("step() before reset(): reset the env with a task first.")
        message = _message_of(action)
        calls = message.get("tool_calls") or []
        if not calls:  # a final answer: the episode is over and the environment scores it
            return self._end(info={"final_answer": message.get("content", "")})
        tool_messages, failures = [], 0
        for call in calls:
            name, result = self._call(call)
            failures += isinstance(result, dict) and set(result) == {"error"}
            tool_messages.append({"role": "tool", "name": name, "content": str(result)})
        info = {"tool_messages": tool_messages, "tool_calls": len(calls), "invalid_action": failures > 0}
        if getattr(self.environment, "done", False) is True:
            return self._end(info=info)
        return StepResult(observation="\n".join(m["content"] for m in tool_messages), info=info)

    def _call(self, call: Any) -> tuple[str, Any]:
        """One tool call -> (tool name, result or TRL's ``{"error": ...}``)."""
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            kind = call.get("type") if isinstance(call, dict) else type(call).__name__
            return str(call.get("name", "unknown") if isinstance(call, dict) else "unknown"), {
                "error": f"Unsupported tool call type: {kind}"
            }
        function = call.get("function") if isinstance(call.get("function"), dict) else call
        name = str(function.get("name", "unknown"))
        arguments = function.get("arguments") or {}
        try:
            if name not in self._tools:
                raise ValueError(f"Tool {name} not found.")
            if not isinstance(arguments, dict):
                raise TypeError(f"the arguments of {name} must be a JSON object, got {type(arguments).__name__}")
            return name, self._tools[name](**arguments)
        except Exception as error:  # noqa: BLE001 - as TRL: the error text goes back to the model
            return name, {"error": str(error)}

    def _end(self, info: dict[str, Any]) -> StepResult:
        get_reward = getattr(self.environment, "get_reward", None)
        reward = float(get_reward()) if callable(get_reward) else 0.0
        info = {**info, "score": 100.0 * reward}
        return StepResult(observation="", reward=reward, done=True, won=reward >= self.success_reward, info=info)

    def close(self) -> None:
        environment, self.environment = self.environment, None
        close = getattr(environment, "close", None)
        if callable(close):
            close()


def _message_of(action: str) -> dict[str, Any]:
    """The parsed assistant message the rollout sends (JSON); any other text is a final answer without tool calls."""
    try:
        message = json.loads(action)
    except (TypeError, ValueError):
        return {"content": action}
    return message if isinstance(message, dict) else {"content": action}


class TRLEnvironment:
    """A picklable `TextEnv` factory for a TRL environment class (or any zero-argument factory of one).

    Args:
        environment_factory: what you would pass to TRL's `GRPOTrainer(environment_factory=...)` (a class defined
            at the top level of a module, for the process pool).
        success_reward: an episode whose `get_reward()` is at least this is a success (`won`).

    `configure_rollout(config)` (called by the rollout) switches the prompt to tool calls and puts the tool schemas
    into the chat template's `tools=`; `tools` lists the schemas.
    """

    def __init__(self, environment_factory: Callable[[], Any], success_reward: float = 1.0):
        if isinstance(environment_factory, dict):
            raise ValueError(
                "TRLEnvironment takes one environment factory; for several environments, train one EPOTrainer per "
                "environment (a dict of factories routes rows in TRL's own loop only)."
            )
        self.environment_factory = environment_factory
        self.success_reward = success_reward
        self._tools: list[dict[str, Any]] | None = None

    def __call__(self) -> TRLToolEnv:
        return TRLToolEnv(self.environment_factory, self.success_reward)

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The JSON schemas of the environment's tools (one probe instance, as TRL builds them)."""
        if self._tools is None:
            from transformers.utils import get_json_schema

            probe = self.environment_factory()
            try:
                self._tools = [get_json_schema(method) for method in tool_methods(probe).values()]
            finally:
                close = getattr(probe, "close", None)
                if callable(close):
                    close()
        return self._tools

    def configure_rollout(self, config):
        """`config` with tool-call prompts: no instruction of ours (the row's prompt is the prompt), the answers
        read as tool calls and the tool schemas in every rendering."""
        style = replace(config.prompt_style, tool_calls=True, use_system_message=False, show_admissible_actions=False)
        kwargs = {**config.chat_template_kwargs, "tools": self.tools}
        if style == config.prompt_style and kwargs == config.chat_template_kwargs:
            return config
        return config.replace(prompt_style=style, chat_template_kwargs=kwargs)

    def __getstate__(self):
        return {**self.__dict__, "_tools": None}  # schemas are rebuilt where needed


def dataset_row(task: TaskSpec | Mapping[str, Any]) -> dict[str, Any]:
    """The TRL dataset row a task row carries (`make_dataset`), as `reset(**row)` receives it."""
    spec = TaskSpec.from_row(task)
    if "row" not in spec.extra:
        raise ValueError(
            "This task row carries no TRL dataset row: build the dataset with trl_epo.envs.trl_tools.make_dataset."
        )
    return json.loads(spec.extra["row"])


def task_rows(rows: Iterable[Mapping[str, Any]], split: str = "train", name: str = ENV_NAME) -> dict[str, list]:
    """Columns of a task dataset for a TRL dataset's rows (each needs a conversational `prompt`): the `TaskSpec`
    columns (task = the row's index), the row's `prompt`, and the whole row as JSON in `extra["row"]`, which
    `reset(**row)` receives (values must be JSON-serialisable)."""
    columns: dict[str, list] = {key: [] for key in (*TaskSpec.FIELDS, "extra", "prompt")}
    for index, row in enumerate(rows):
        row = dict(row)
        if not isinstance(row.get("prompt"), list):
            raise ValueError(
                f"Row {index} has no conversational `prompt` (a list of messages): TRL's environment_factory needs "
                "one, e.g. [{'role': 'user', 'content': 'Guess the number.'}]."
            )
        try:
            payload = json.dumps(row)
        except TypeError as error:
            raise ValueError(f"Row {index} is not JSON-serialisable ({error}); keep plain values in it.") from error
        spec = TaskSpec(env=name, task=str(index), seed=int(row.get("seed", 0) or 0), split=split)
        for key, value in spec.to_row().items():
            columns[key].append(value if key != "extra" else {"row": payload})
        columns["prompt"].append(row["prompt"])
    return columns


def make_dataset(rows, split: str = "train", name: str = ENV_NAME):
    """A `datasets.Dataset` of tasks for `EPOTrainer(env_factory=TRLEnvironment(...))` from a TRL dataset (or a
    list of row dicts), see `task_rows`."""
    from datasets import Dataset

    return Dataset.from_dict(task_rows(rows, split, name))
