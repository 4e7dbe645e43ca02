"""EPOTrainer on TRL's own entry points: a `GRPOConfig` as the drop-in config, and what each `env_*` setting does on
TRL's paths (`tools=`, `environment_factory=`, a custom `rollout_func`, a plain prompt dataset), where TRL generates
and trains one padded row per episode and trl_epo's own multi-turn rollout (`env_factory=`) is not used.

Every `env_*` setting either applies there or, when set to anything but its default, is refused with the reason
(`TRL_PATH_SETTINGS`); a new `env_*` field that is not in the table is refused the same way, so none is ever
silently ignored.
"""

from __future__ import annotations

import copy
from dataclasses import MISSING, fields
from typing import Any

from trl import GRPOConfig

from .config import EPOConfig
from .rollout.config import check_setting


APPLIES = "applies"
_ROLLOUT = "it configures trl_epo's own multi-turn rollout (`env_factory=`)"
_ROWS = "it configures the training rows of `env_factory=` episodes"

TRL_PATH_SETTINGS: dict[str, str] = {
    # applies on TRL's batch
    "env_updates_per_rollout": APPLIES,  # K optimizer steps per generation (TRL's steps_per_generation), every row once
    "env_lr_per_rollout": APPLIES,  # the LR schedule steps once per generation batch of K optimizer steps
    "env_importance_sampling": APPLIES,  # multi-turn batches (tool / env mask) with vLLM's IS correction
    "env_log_episodes": APPLIES,  # False: TRL's paths write no transcripts (TRL's `log_completions` logs them)
    # refused when set: they belong to trl_epo's rollout, rows or evaluation
    "env_max_turns": f"{_ROLLOUT}; TRL's tool loop is bounded by `max_tool_calling_iterations`",
    "env_max_turn_tokens": f"{_ROLLOUT}; TRL's `max_completion_length` bounds the whole episode there",
    "env_history_turns": f"{_ROLLOUT}; TRL's tool loop keeps the whole conversation in context",
    "env_reward": f"{_ROLLOUT}; on TRL's paths the reward comes from `reward_funcs` (or the environment's `get_reward`)",
    "env_invalid_action_penalty": f"{_ROLLOUT}; penalise malformed tool calls in a reward function instead",
    "env_error_reward": f"{_ROLLOUT}; TRL's tool loop returns a failing tool's error to the model",
    "env_action_tag": _ROLLOUT + "; TRL parses tool calls with the chat template's response schema",
    "env_instruction": _ROLLOUT + "; put the instruction in the dataset's prompts",
    "env_show_admissible_actions": _ROLLOUT,
    "env_max_observation_chars": _ROLLOUT,
    "env_pool_backend": _ROLLOUT + "; TRL calls tools in the trainer process",
    "env_pool_size": _ROLLOUT,
    "env_step_timeout": _ROLLOUT + "; TRL calls tools without a timeout",
    "env_reuse_kv_cache": _ROLLOUT,
    "env_sample_layout": f"{_ROWS}; TRL's paths train one row per episode",
    "env_advantage_baseline": f"{_ROWS}; with one row per episode GRPO's baseline is over episodes",
    "env_forward_token_budget": (
        f"{_ROWS}; TRL's loss makes one forward per micro-batch (bound its memory with per_device_train_batch_size; "
        "None is accepted)"
    ),
    "env_packed_mask_limit_gb": f"{_ROWS} (the packed layout)",
    "env_eval_temperature": (
        "it configures the success evaluation of `env_factory=` task splits; TRL's `evaluate()` reports the loss and "
        "rewards on `eval_dataset` (use `temperature` / TRL's generation settings)"
    ),
    "env_eval_seeds": "it configures the success evaluation of `env_factory=` task splits (TRL's `evaluate()` runs)",
}
"""`env_*` field -> "applies" on TRL's paths, or why it is refused there when set."""
_ACCEPTED_VALUES = {"env_forward_token_budget": (None,), "env_log_episodes": (False,)}


def _default(f) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def refused_trl_path_settings(args: EPOConfig) -> dict[str, str]:
    """The `env_*` settings of `args` that differ from their default and cannot apply on TRL's paths -> why."""
    refused = {}
    for f in fields(EPOConfig):
        if not f.name.startswith("env_"):
            continue
        value = getattr(args, f.name)
        if value == _default(f) or value in _ACCEPTED_VALUES.get(f.name, ()):
            continue
        reason = TRL_PATH_SETTINGS.get(f.name, _ROLLOUT)
        if reason != APPLIES:
            refused[f.name] = f"{f.name}={value!r}: {reason}"
    return refused


def check_trl_path_settings(args: EPOConfig, env_rollout, trainer_kwargs: dict[str, Any]) -> None:
    """Refuse the combinations that cannot work: trl_epo's multi-turn rollout (`env_rollout`, from `env_factory=`)
    with TRL's agent arguments, and, on TRL's paths, `env_*` settings that do not apply there (`TRL_PATH_SETTINGS`)."""
    if env_rollout is not None:
        check_setting(  # env rows: a rollout is consumed in K whole optimizer steps
            args.steps_per_generation % args.gradient_accumulation_steps == 0,
            "steps_per_generation",
            args.steps_per_generation,
            f"with `env_factory=` it must be a multiple of gradient_accumulation_steps ({args.gradient_accumulation_steps})",
        )
        trl_agent = [k for k in ("environment_factory", "tools") if trainer_kwargs.get(k)]
        if trl_agent:
            raise ValueError(
                f"Pass either `env_factory=` (trl_epo's multi-turn rollout) or TRL's `{'=`, `'.join(trl_agent)}=` "
                "(TRL's tool loop), not both: TRL would set up its tools (and may swap the chat template) while "
                "trl_epo's rollout plays `env_factory`'s environment and never calls them."
            )
        return
    refused = refused_trl_path_settings(args)
    if refused:
        raise ValueError(
            "These settings do not apply when EPOTrainer trains TRL's own batch (`tools=`, `environment_factory=`, a "
            "`rollout_func`, or a prompt dataset; no `env_factory=`): "
            + "; ".join(refused.values())
            + ". Remove them, or train with `env_factory=` (trl_epo's multi-turn rollout)."
        )


def epo_config_of(config: GRPOConfig) -> EPOConfig:
    """An EPOConfig with `config`'s values (GRPOConfig's processed fields, as they are) and EPO's defaults for every
    `epo_*` / `env_*` field. GRPOConfig's `__post_init__` is not rerun (it would refuse its own derived
    `generation_batch_size` next to `steps_per_generation`); the EPO fields are validated as EPOConfig does."""
    converted = EPOConfig.__new__(EPOConfig)
    converted.__dict__.update(copy.copy(config.__dict__))
    for f in fields(EPOConfig):
        if f.name not in converted.__dict__:
            setattr(converted, f.name, _default(f))
    converted._check_epo_fields()
    return converted
