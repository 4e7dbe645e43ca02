"""An OpenEnv environment server (`pip install "trl-epo[openenv]"`, `openenv` 0.10) played as a `TextEnv`.

`OpenEnvTextEnv(base_url)` talks to a running OpenEnv server over its WebSocket session protocol with the
`openenv` package's own client (`GenericEnvClient` by default: plain-dict actions and observations, no env package
needed; or your env's typed `EnvClient` subclass): `reset` and `step` map onto the client's, `state()` is the
server's state. Each env instance (one per `EnvPool` slot) holds its own session.

* **Task -> reset**: `reset(seed=task.seed, **task.extra["reset_kwargs"])`; `task.extra["task_description"]`, when
  given, is the task text of the prompt.
* **Action**: the text inside `<action>...</action>` becomes ``{action_field: text}`` (a dict, or
  ``action_class(**{action_field: text})`` for a typed client).
* **Observation**: the observation's `observation_field` when given, else its fields other than done/reward/metadata
  as JSON.
* **Reward**: `info["score"]` = 100 x the episode's return so far (`env_reward="score"` trains on the return);
  `won` = the episode is done with a return >= `success_reward` (`env_reward="success"`).
* **Failures never crash training**: a refused connection, a server that dies mid-episode, a server error or a step
  slower than `message_timeout_s` raises here (after dropping the broken session, so the next reset reconnects), and
  `EnvPool` turns it into a failed episode (`StepResult.failure`, counted in `rollout/env_error_episodes`, excluded
  from the advantages with `env_error_reward="exclude"`); the pool's `env_step_timeout` bounds a step as well.

Model text is data: it travels as a JSON string value to the server, which must treat it as such.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .base import StepResult, TaskSpec


_RESERVED = ("done", "reward", "metadata")


class OpenEnvSessionError(RuntimeError):
    """The OpenEnv session failed (no connection, the server went away or errored, a step too slow). Not a
    `TimeoutError`, so that `EnvPool` reports what happened rather than its own step timeout."""


class OpenEnvTextEnv:
    """A `TextEnv` over an OpenEnv server session (see the module docstring). Picklable before and after use (the
    connection is opened lazily, in the process that plays).

    Args:
        base_url: the server, e.g. ``"http://127.0.0.1:8000"`` (or ``ws://``).
        action_field: the action's text field (the echo env's ``"message"``).
        observation_field: the observation field shown to the agent (None: all fields as JSON).
        client_class: an `openenv.core.EnvClient` subclass; default `GenericEnvClient`.
        action_class: build actions as ``action_class(**{action_field: text})`` (typed clients); default: a dict.
        success_reward: an episode that ends with at least this return is a success.
        connect_timeout_s / message_timeout_s: the client's timeouts; a slower step is an env error.
    """

    def __init__(
        self,
        base_url: str,
        action_field: str = "message",
        observation_field: str | None = None,
        client_class: type | None = None,
        action_class: type | None = None,
        success_reward: float = 1.0,
        connect_timeout_s: float = 10.0,
        message_timeout_s: float = 30.0,
    ):
        self.base_url = base_url
        self.action_field = action_field
        self.observation_field = observation_field
        self.client_class = client_class
        self.action_class = action_class
        self.success_reward = success_reward
        self.connect_timeout_s = connect_timeout_s
        self.message_timeout_s = message_timeout_s
        self._client = None
        self._return = 0.0

    # ---- the session
    def _session(self):
        if self._client is None:
            if self.client_class is None:
                try:
                    from openenv.core.generic_client import GenericEnvClient
                except ImportError as error:
                    raise ImportError(
                        'OpenEnvTextEnv needs the `openenv` package: pip install "trl-epo[openenv]".'
                    ) from error
                client_class = GenericEnvClient
            else:
                client_class = self.client_class
            client = client_class(
                base_url=self.base_url,
                connect_timeout_s=self.connect_timeout_s,
                message_timeout_s=self.message_timeout_s,
            )
            self._client = client.sync()
        return self._client

    def _call(self, what: str, *args, **kwargs):
        try:
            return getattr(self._session(), what)(*args, **kwargs)
        except Exception as error:  # the session is unusable now: reconnect on the next reset
            self._drop_session()
            if isinstance(error, TimeoutError):
                detail = f"did not answer {what} within {self.message_timeout_s} s"
            else:
                detail = f"{what} failed: {type(error).__name__}: {error}"
            raise OpenEnvSessionError(f"OpenEnv server {self.base_url} {detail}") from error

    def _drop_session(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - a dead session closes as well as it can
                pass

    # ---- TextEnv
    def reset(self, task: TaskSpec | Mapping[str, Any]) -> StepResult:
        spec = TaskSpec.from_row(task)
        kwargs = {"seed": spec.seed, **dict(spec.extra.get("reset_kwargs") or {})}
        result = self._call("reset", **kwargs)
        self._return = 0.0
        info = {"task_description": str(spec.extra.get("task_description", ""))}
        return self._result(result, info)

    def step(self, action: str) -> StepResult:
        text = str(action)
        payload = {self.action_field: text}
        result = self._call("step", self.action_class(**payload) if self.action_class is not None else payload)
        return self._result(result, {})

    def state(self) -> Any:
        """The server's state of this session (e.g. ``{"episode_id": ..., "step_count": ...}``)."""
        return self._call("state")

    def close(self) -> None:
        self._drop_session()

    # ---- reading results
    def _result(self, result, info: dict[str, Any]) -> StepResult:
        reward = float(result.reward or 0.0)
        self._return += reward
        done = bool(result.done)
        info = {**info, "score": 100.0 * self._return}
        if result.metadata:
            info["metadata"] = result.metadata
        won = done and self._return >= self.success_reward
        return StepResult(observation=self._text(result.observation), reward=reward, done=done, won=won, info=info)

    def _text(self, observation: Any) -> str:
        if hasattr(observation, "model_dump"):
            observation = observation.model_dump()
        if not isinstance(observation, Mapping):
            return str(observation)
        if self.observation_field is not None:
            return str(observation.get(self.observation_field, ""))
        shown = {k: v for k, v in observation.items() if k not in _RESERVED}
        return json.dumps(shown, ensure_ascii=False, default=str)

    def __getstate__(self):
        return {**self.__dict__, "_client": None}
