"""`RolloutConfig`: the settings of a multi-turn rollout, the rollout's mode tables, and THE mapping from an
`EPOConfig` (or a run's recorded `epo_run.json`) onto them.

Every place that plays episodes (training, periodic and offline evaluation, benchmarks) builds its `RolloutConfig`
here, so an evaluated model is shown exactly the prompts it was trained on.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..envs.pool import BACKENDS as POOL_BACKENDS
from ..envs.prompting import PromptStyle
from ..envs.registry import EnvSpec, find_env


REWARD_MODES = ("success", "score", "won10")
"""Episode reward: 1 if won / env score / 100 / 10 x won (the paper's code)."""
ENV_ERROR_MODES = ("zero", "exclude")
"""An episode whose env failed: reward 0, or no reward (left out of its group's baseline, advantage 0)."""
DEFAULT_MAX_TURNS = 30

# RolloutConfig field -> the EPOConfig field it comes from (error messages name both).
ARG_NAMES = {
    "max_turns": "env_max_turns",
    "max_turn_tokens": "env_max_turn_tokens",
    "max_episode_tokens": "max_completion_length",
    "history_turns": "env_history_turns",
    "reward": "env_reward",
    "invalid_action_penalty": "env_invalid_action_penalty",
    "env_error_reward": "env_error_reward",
    "pool_backend": "env_pool_backend",
    "pool_size": "env_pool_size",
    "step_timeout": "env_step_timeout",
}


def check_setting(ok: bool, name: str, value: Any, allowed: str) -> None:
    """The one validation message style of the rollout settings (EPOConfig's env_* fields validate through it)."""
    if not ok:
        source = f" (EPOConfig.{ARG_NAMES[name]})" if name in ARG_NAMES else ""
        raise ValueError(f"`{name}`{source} = {value!r} is invalid: {allowed}.")


@dataclass
class RolloutConfig:
    """Settings of a multi-turn rollout (`EPOConfig`'s `env_*` fields map onto these; see `from_args`).

    Attributes:
        max_turns: turns per episode (paper: 30 ScienceWorld, 50 ALFWorld); an episode that reaches it is truncated.
        max_turn_tokens: new tokens the model may generate in one turn (paper: 512).
        max_episode_tokens: completion-token budget of an episode (generated + environment tokens); None: the
            generator's default (the trainer's `max_completion_length`).
        history_turns: None (default) keeps the whole episode in context: one growing conversation. An integer k
            gives the paper's windowed prompts: every turn the model sees a fresh prompt with the task, its last k
            (observation, action) pairs and the current observation.
        reward: one of `REWARD_MODES`.
        invalid_action_penalty: subtracted from the reward for every invalid turn (the paper's code: 0.1).
        env_error_reward: one of `ENV_ERROR_MODES`.
        prompt_style: the prompt (instruction, action tag, observation layout): `PromptStyle`.
        chat_template_kwargs: extra arguments of the tokenizer's chat template for every prompt the rollout renders
            (e.g. Qwen3's ``{"enable_thinking": False}``), as TRL passes its own `chat_template_kwargs`.
        pool_backend / pool_size / step_timeout: the `EnvPool` that steps the envs (pool_size = episodes played at the
            same time on this process; default: all episodes of a generation batch).
        progress_bar: show a tqdm bar over turns (main process only).
        reuse_kv_cache: with HF `generate` and full contexts, continue each turn from the last turn's KV cache
            instead of re-encoding the conversation (`ModelGenerator`); sampling is unchanged.
    """

    max_turns: int = DEFAULT_MAX_TURNS
    max_turn_tokens: int = 512
    max_episode_tokens: int | None = None
    history_turns: int | None = None
    reward: str = "success"
    invalid_action_penalty: float = 0.0
    env_error_reward: str = "exclude"
    prompt_style: PromptStyle = field(default_factory=PromptStyle)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    pool_backend: str = "process"
    pool_size: int | None = None
    step_timeout: float = 60.0
    progress_bar: bool = True
    reuse_kv_cache: bool = True

    def __post_init__(self):
        check_setting(self.max_turns >= 1, "max_turns", self.max_turns, "it must be >= 1")
        check_setting(self.max_turn_tokens >= 1, "max_turn_tokens", self.max_turn_tokens, "it must be >= 1")
        check_setting(
            self.max_episode_tokens is None or self.max_episode_tokens >= 1,
            "max_episode_tokens",
            self.max_episode_tokens,
            "it must be >= 1",
        )
        check_setting(
            self.history_turns is None or self.history_turns >= 0,
            "history_turns",
            self.history_turns,
            "it must be None (full context) or an integer >= 0",
        )
        check_setting(self.reward in REWARD_MODES, "reward", self.reward, f"use one of {REWARD_MODES}")
        check_setting(
            self.invalid_action_penalty >= 0,
            "invalid_action_penalty",
            self.invalid_action_penalty,
            "it is subtracted per invalid turn: give a value >= 0",
        )
        check_setting(
            self.env_error_reward in ENV_ERROR_MODES,
            "env_error_reward",
            self.env_error_reward,
            f"use one of {ENV_ERROR_MODES}",
        )
        check_setting(self.pool_backend in POOL_BACKENDS, "pool_backend", self.pool_backend, f"use {POOL_BACKENDS}")
        check_setting(
            self.pool_size is None or self.pool_size >= 1, "pool_size", self.pool_size, "it must be >= 1 or None"
        )
        check_setting(self.step_timeout > 0, "step_timeout", self.step_timeout, "it must be > 0 seconds")
        if isinstance(self.prompt_style, Mapping):
            self.prompt_style = PromptStyle.from_dict(self.prompt_style)
        self.chat_template_kwargs = dict(self.chat_template_kwargs or {})

    @property
    def windowed(self) -> bool:
        return self.history_turns is not None

    # ---- THE mapping from EPOConfig
    @classmethod
    def from_args(cls, args, env: EnvSpec | str | None = None) -> RolloutConfig:
        """The rollout settings of an `EPOConfig` (its `env_*` fields) for the environment `env` (a registry entry or
        name; None or an unregistered name: the generic defaults). Fields left at None in `args` (turns per episode,
        instruction, observation length) take the env's registry defaults."""
        spec = find_env(env) if isinstance(env, str) else env
        style = (spec.prompt_style if spec is not None else _generic_style)(
            instruction=args.env_instruction,
            action_tag=args.env_action_tag,
            show_admissible_actions=args.env_show_admissible_actions,
            max_observation_chars=args.env_max_observation_chars,
        )
        max_turns = args.env_max_turns or (spec.max_turns if spec is not None else DEFAULT_MAX_TURNS)
        return cls(
            max_turns=max_turns,
            max_turn_tokens=args.env_max_turn_tokens,
            max_episode_tokens=args.max_completion_length,
            history_turns=args.env_history_turns,
            reward=args.env_reward,
            invalid_action_penalty=args.env_invalid_action_penalty,
            env_error_reward=args.env_error_reward,
            prompt_style=style,
            chat_template_kwargs=dict(getattr(args, "chat_template_kwargs", None) or {}),
            pool_backend=args.env_pool_backend,
            pool_size=args.env_pool_size,
            step_timeout=args.env_step_timeout,
            progress_bar=not args.disable_tqdm,
            reuse_kv_cache=args.env_reuse_kv_cache,
        )

    # ---- the recorded form (epo_run.json), read back by evaluation
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prompt_style"] = self.prompt_style.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> RolloutConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in {**data, **overrides}.items() if k in known})

    def replace(self, **changes: Any) -> RolloutConfig:
        return replace(self, **changes)


def _generic_style(**overrides: Any) -> PromptStyle:
    return PromptStyle(**{k: v for k, v in overrides.items() if v is not None})


def rollout_record(config: RolloutConfig, env: str | None, env_factory=None) -> dict[str, Any]:
    """What `epo_run.json` records of a rollout, for evaluation to rebuild it: the env (its registry name), the env
    constructor's keyword arguments (when the factory is a `functools.partial` with JSON-serialisable ones) and the
    resolved settings (`RolloutConfig.from_dict` reads them back)."""
    spec = find_env(env)
    env_kwargs = dict(env_factory.keywords) if isinstance(env_factory, functools.partial) else {}
    try:
        json.dumps(env_kwargs)
    except TypeError:
        env_kwargs = {}
    return {"env": spec.name if spec is not None else env, "env_kwargs": env_kwargs, "config": config.to_dict()}
