"""EPOConfig: TRL's GRPOConfig plus the EPO objective and the multi-turn environment rollout."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from trl import GRPOConfig

from .gigpo import ADVANTAGE_ESTIMATORS, ANCHOR_SOURCES, STEP_NORMS, check_gigpo_settings
from .group_filter import check_filter_settings
from .importance import IMPORTANCE_SAMPLING_MODES
from .objective import AGGREGATIONS, PHASE_SCHEDULES, REFERENCE_MODES, SMOOTHING_MODES
from .preemption import resolve_signals
from .rollout.config import ENV_ERROR_MODES, POOL_BACKENDS, REWARD_MODES, RolloutConfig, check_setting
from .rows import ADVANTAGE_BASELINES, LAYOUTS, resolve_layout


@dataclass
class EPOConfig(GRPOConfig):
    r"""
    Configuration class for the [`EPOTrainer`]: every [`~trl.GRPOConfig`] field plus the EPO objective (Xu et al.,
    2025, [arXiv 2509.22576](https://huggingface.co/papers/2509.22576), Eq. 6) and the multi-turn environment rollout.

        L = L_base - epo_entropy_coef * L_H + epo_entropy_coef * beta_k * L_smooth

    `L_base` is TRL's GRPO loss for `loss_type`; `L_H` the trajectory-level entropy of the action tokens (Eq. 2);
    `L_smooth` is `epo_smoothing_alpha` times the same aggregation of the hinge penalty that keeps token entropy in the
    corridor `[epo_kappa_low * H_ref, epo_kappa_high * H_ref]` around the historical reference `H_ref` (Eqs. 3-4);
    `beta_k` is the phase weight (Eq. 5). GRPOConfig's own `entropy_coef` / `use_adaptive_entropy` (TRL's token-mean
    bonus) stay part of `L_base` when set: the two bonuses add up (with a warning). With `epo_entropy_coef=0` the
    trainer is exactly [`~trl.GRPOTrainer`]; `EPOTrainer(args=GRPOConfig(...))` converts the config to an EPOConfig
    with the defaults below.

    Defaults follow the paper (lambda = 1e-3, kappa_l = 0, kappa_r = 2, gamma = 3, alpha = 0.1 as on ALFWorld; the
    paper uses 0.05 on ScienceWorld). The `env_*` fields that default to `None` take the environment's own defaults
    from its registry entry (`trl_epo.envs.registry`).

    Parameters:
        > EPO objective

        epo_entropy_coef (`float`, *optional*, defaults to `1e-3`):
            lambda: weight of the trajectory-level entropy bonus L_H and of the smoothing term (Eq. 6). `0` disables
            EPO (the trainer is then GRPOTrainer).
        epo_smoothing (`str`, *optional*, defaults to `"hinge"`):
            `"hinge"` (paper v2: the differentiable corridor penalty, Eqs. 3-4) or `"none"` (EPO-Base).
        epo_smoothing_alpha (`float`, *optional*, defaults to `0.1`):
            alpha: weight of the corridor penalty (paper: 0.05 ScienceWorld, 0.1 ALFWorld). With `alpha * beta < 1`
            the corridor only damps the bonus above it; it pulls entropy down only when `alpha * beta > 1`.
        epo_kappa_low (`float`, *optional*, defaults to `0.0`):
            kappa_l: lower corridor bound as a multiple of the entropy reference.
        epo_kappa_high (`float`, *optional*, defaults to `2.0`):
            kappa_r: upper corridor bound as a multiple of the entropy reference.
        epo_reference (`str`, *optional*, defaults to `"cumulative"`):
            The entropy reference H_ref: `"cumulative"` (paper: mean of all previous steps' entropies), `"per_turn"`
            (one cumulative reference per true turn index), `"ema"` or `"window"`.
        epo_reference_ema_decay (`float`, *optional*, defaults to `0.9`):
            Decay d of the `"ema"` reference: H_ref <- d * H_ref + (1 - d) * H_k.
        epo_reference_window (`int`, *optional*, defaults to `10`):
            Number of recent optimizer steps averaged by the `"window"` reference.
        epo_phase_schedule (`str`, *optional*, defaults to `"exp"`):
            beta_k: `"exp"` (1 + exp(-gamma * k / floor(K/2)), Eq. 5, K = the run's optimizer steps) or `"constant"`.
        epo_phase_gamma (`float`, *optional*, defaults to `3.0`):
            gamma of the phase weight (Eq. 5).
        epo_entropy_aggregation (`str`, *optional*, defaults to `"trajectory"`):
            `"trajectory"` (Eq. 2: token mean per turn, mean over turns, mean over trajectories) or `"token"`.

        > Multi-turn environment rollouts (used when [`EPOTrainer`] gets `env_factory=`)

        env_max_turns (`int` or `None`, *optional*, defaults to `None`):
            Maximum turns per episode; `None`: the env's default (toy 15, ScienceWorld 30, ALFWorld 50, as the paper).
        env_max_turn_tokens (`int`, *optional*, defaults to `512`):
            Maximum new tokens per turn (paper: 512). The whole episode is bounded by `max_completion_length`.
        env_history_turns (`int` or `None`, *optional*, defaults to `None`):
            `None`: the whole episode stays in context (one growing conversation). `k`: the paper's windowed prompts
            (task + last k (observation, action) pairs + current observation; paper: k = 2).
        env_reward (`str`, *optional*, defaults to `"success"`):
            Episode reward: `"success"` (1 if won), `"score"` (env score / 100) or `"won10"` (10 x won, the paper's
            code).
        env_invalid_action_penalty (`float`, *optional*, defaults to `0.0`):
            Subtracted from the episode reward per invalid (unparsable) turn (the paper's code: 0.1).
        env_error_reward (`str`, *optional*, defaults to `"exclude"`):
            An episode whose env raised, hung or died: `"exclude"` (no reward: advantage 0 and left out of its group's
            baseline, so an infrastructure failure never counts as a real 0) or `"zero"` (reward 0).
        env_action_tag (`str`, *optional*, defaults to `"action"`):
            The agent answers inside `<tag>...</tag>`; an answer without it is an invalid turn.
        env_instruction (`str` or `None`, *optional*, defaults to `None`):
            The agent's system instruction (`{example}` is replaced with an example action); `None`: the env's own.
        env_show_admissible_actions (`bool`, *optional*, defaults to `True`):
            List the env's admissible actions in each observation, when the env gives them.
        env_max_observation_chars (`int` or `None`, *optional*, defaults to `None`):
            Observations longer than this are cut (with a note); `None`: the env's default (4000).
        env_pool_backend (`str`, *optional*, defaults to `"process"`):
            How envs are stepped in parallel: `"process"` (a worker process per env, with timeouts and crash
            recovery), `"thread"` (thread-safe pure-Python envs) or `"inline"`.
        env_pool_size (`int` or `None`, *optional*, defaults to `None`):
            Envs played at the same time per process; `None`: the whole local generation batch. Smaller values play
            the batch in waves (less memory: a ScienceWorld env holds a ~0.45 GB JVM).
        env_step_timeout (`float`, *optional*, defaults to `60.0`):
            Seconds one env step may take before its episode is failed and its worker restarted.
        env_log_episodes (`bool`, *optional*, defaults to `True`):
            Write every episode's transcript to `<output_dir>/_rollouts/*.jsonl` (not uploaded by `push_to_hub`).
        env_reuse_kv_cache (`bool`, *optional*, defaults to `True`):
            With HF generate and full contexts, continue each turn from the previous turn's KV cache instead of
            re-encoding the conversation (sampling is unchanged; skipped where it could not be exact). The kept cache
            may grow to 2x a fresh encoding's before it is rebuilt: turn it off if generation memory is tight.
        env_sample_layout (`str` or `None`, *optional*, defaults to `None`):
            Training rows of windowed episodes: `"step"` (one row per turn: prompt = the ids the model saw that turn,
            completion = its answer; the default with `env_history_turns`) or `"packed"` (one row per episode, the
            turns' blocks packed in it). Full-context episodes are one row each (`"episode"`).
        env_updates_per_rollout (`int` or `None`, *optional*, defaults to `None`):
            K: optimizer steps that consume one rollout's rows, every row exactly once (sets TRL's
            `steps_per_generation` to K x `gradient_accumulation_steps`; None: TRL's `steps_per_generation`, by default
            1 step). The reference code takes one step per mini-batch of 128 turn rows (64 for PPO): K ~ rows / 128.
            Episodes are dealt to the steps at random (seeded by `seed` and the step), and every step is normalised
            with the rollout's counts / K, so an episode's weight does not depend on the step it lands in.
        env_advantage_baseline (`str`, *optional*, defaults to `"episode"`):
            `"episode"`: GRPO's baseline over the G episodes of a group (the paper's formula). `"rows"`: the baseline
            over all turn rows of the group, each episode weighted by its number of turns in every layout (the paper's
            code, verl-agent). Either way every row of an episode carries its episode's advantage.
        env_forward_token_budget (`int` or `None`, *optional*, defaults to `16384`):
            Tokens (padding included) per forward/backward pass: a micro-batch's rows are cut into chunks of at most
            this many tokens, so memory is set by the longest turn, not by the batch. A longer row gets its own pass.
        env_lr_per_rollout (`bool`, *optional*, defaults to `False`):
            Step the learning-rate schedule once per rollout instead of once per optimizer step (the reference code's
            behaviour with K > 1): the schedule runs over `max_steps / K` rollouts, warm-up included.
        env_packed_mask_limit_gb (`float`, *optional*, defaults to `2.0`):
            The packed layout without flash attention builds a dense B x L x L attention mask; a forward whose mask
            would exceed this many GiB is refused with an error that says how to avoid it.
        env_eval_temperature (`float`, *optional*, defaults to `0.4`):
            Sampling temperature of the periodic evaluation on `eval_dataset` (the paper validates at 0.4).
        env_eval_seeds (`list[int]`, *optional*, defaults to `[0]`):
            Sampling seeds of the periodic evaluation: each eval task is played once per seed.
        env_importance_sampling (`str`, *optional*, defaults to `"token_truncate"`):
            The vLLM-vs-trainer importance-sampling correction of env rollouts (with `use_vllm=True` and TRL's
            `vllm_importance_sampling_correction`, bounds `vllm_importance_sampling_clip_min/max`). It replaces TRL's
            `vllm_importance_sampling_mode` for env rows, whose default `"sequence_mask"` multiplies the token ratios
            of a whole row: for a multi-turn episode trained as one row (thousands of action tokens over 30-50 turns)
            a per-token mismatch of a few hundredths of a nat pushes that product out of [clip_min, clip_max] and masks
            the long episodes. Default `"token_truncate"`: each action token's own ratio, clipped at clip_max, which
            neither episode length nor the number of turns can mask or crush (truncated IS, verl's default). Also
            `"token_mask"`, `"turn_truncate"` / `"turn_mask"` (one ratio per turn, the product over the tokens of one
            sampling call) and TRL's `"sequence_truncate"` / `"sequence_mask"` (one ratio per row).
        env_advantage_estimator (`str`, *optional*, defaults to `"grpo"`):
            `"grpo"`: every turn of an episode gets its episode's advantage. `"gigpo"` (GiGPO, arXiv 2505.10978,
            `trl_epo.gigpo`): the episode advantage plus `env_gigpo_step_weight` x a step advantage from the turns of
            the group in the same anchor state (their discounted returns, normalised within that step group).
        env_gigpo_gamma (`float`, *optional*, defaults to `0.95`):
            GiGPO's discount of the step returns.
        env_gigpo_step_weight (`float`, *optional*, defaults to `1.0`):
            omega: the weight of the step advantage.
        env_gigpo_step_norm (`str`, *optional*, defaults to `"mean_norm"`):
            Step advantage within a step group: `"mean_norm"` (return - mean) or `"mean_std_norm"` (/ (std + 1e-6)).
        env_gigpo_similarity (`float` or `None`, *optional*, defaults to `None`):
            Merge anchor keys whose difflib similarity ratio is at least this (verl-agent: 0.95); None: exact keys.
        env_gigpo_anchor (`str`, *optional*, defaults to `"env"`):
            Anchor key of a turn: `"env"` (the env's canonical state key, `StepResult.info["anchor"]`, where it gives
            one; else its observation text) or `"observation"` (always the env's raw observation text, verl-agent).
        env_filter_groups (`bool`, *optional*, defaults to `False`):
            Dynamic sampling: drop groups whose rewards all agree and refill the batch from rollouts of freshly drawn
            tasks (`trl_epo.group_filter`, which also says what is trained when none is informative).
        env_filter_max_rollouts (`int`, *optional*, defaults to `10`):
            At most this many rollouts per step with `env_filter_groups`, the first included (verl: 10).
        env_max_failed_rollouts (`int` or `None`, *optional*, defaults to `3`):
            Stop training with an error after this many consecutive rollouts in which every episode's environment
            failed (at reset or mid-episode, on all processes); `None` never stops. Failed episodes are counted
            (`rollout/env_error_episodes`) and never trained on, so such a run would otherwise go on learning nothing.

        > Preemption

        preemption_signals (`list[str]`, *optional*, defaults to `["SIGTERM"]`):
            Signals that preempt training (`trl_epo.preemption`): the trainer finishes the optimizer step in flight,
            saves a checkpoint (also under `save_strategy="no"`; with the rest of the rollout inside its K updates),
            closes the env workers and exits with status 75 (`epo_preempted.json` names the checkpoint); all
            processes stop at the same step. Any of `"SIGTERM"`, `"SIGUSR1"`, `"SIGUSR2"`, `"SIGINT"`, `"SIGHUP"`; `[]`
            turns it off. SIGTERM is on by default because it is safe: without a handler it kills the run mid-step
            and loses everything since the last checkpoint; with it the run still ends, one step later, resumable.
    """

    # ---- EPO objective
    epo_entropy_coef: float = field(
        default=1e-3,
        metadata={"help": "lambda: weight of the trajectory-level entropy bonus and the smoothing term (0: GRPO)."},
    )
    epo_smoothing: str = field(
        default="hinge",
        metadata={"help": "'hinge' (differentiable corridor) or 'none' (EPO-Base).", "choices": list(SMOOTHING_MODES)},
    )
    epo_smoothing_alpha: float = field(default=0.1, metadata={"help": "alpha: weight of the corridor penalty."})
    epo_kappa_low: float = field(default=0.0, metadata={"help": "kappa_l: lower corridor bound (x H_ref)."})
    epo_kappa_high: float = field(default=2.0, metadata={"help": "kappa_r: upper corridor bound (x H_ref)."})
    epo_reference: str = field(
        default="cumulative",
        metadata={"help": "The entropy reference H_ref.", "choices": list(REFERENCE_MODES)},
    )
    epo_reference_ema_decay: float = field(default=0.9, metadata={"help": "Decay of the 'ema' reference, in [0, 1)."})
    epo_reference_window: int = field(default=10, metadata={"help": "Steps averaged by the 'window' reference."})
    epo_phase_schedule: str = field(
        default="exp", metadata={"help": "Phase weight beta_k (Eq. 5).", "choices": list(PHASE_SCHEDULES)}
    )
    epo_phase_gamma: float = field(default=3.0, metadata={"help": "gamma of the phase weight (Eq. 5), >= 0."})
    epo_entropy_aggregation: str = field(
        default="trajectory",
        metadata={"help": "Entropy aggregation: Eq. 2 or a token mean.", "choices": list(AGGREGATIONS)},
    )

    # ---- multi-turn environment rollouts
    env_max_turns: int | None = field(
        default=None, metadata={"help": "Maximum turns per episode (None: the env's default)."}
    )
    env_max_turn_tokens: int = field(default=512, metadata={"help": "Maximum new tokens per turn."})
    env_history_turns: int | None = field(
        default=None,
        metadata={"help": "None: whole episode in context; k: windowed prompts with the last k steps (paper: 2)."},
    )
    env_reward: str = field(default="success", metadata={"help": "Episode reward.", "choices": list(REWARD_MODES)})
    env_invalid_action_penalty: float = field(
        default=0.0, metadata={"help": "Subtracted from the episode reward per invalid turn (paper's code: 0.1)."}
    )
    env_error_reward: str = field(
        default="exclude",
        metadata={"help": "Reward of an episode whose env failed.", "choices": list(ENV_ERROR_MODES)},
    )
    env_action_tag: str = field(default="action", metadata={"help": "The agent answers inside <tag>...</tag>."})
    env_instruction: str | None = field(
        default=None, metadata={"help": "System instruction ('{example}': an example action); None: the env's."}
    )
    env_show_admissible_actions: bool = field(
        default=True, metadata={"help": "List the env's admissible actions in each observation."}
    )
    env_max_observation_chars: int | None = field(
        default=None, metadata={"help": "Observations longer than this are cut (None: the env's default)."}
    )
    env_pool_backend: str = field(
        default="process", metadata={"help": "How envs are stepped in parallel.", "choices": list(POOL_BACKENDS)}
    )
    env_pool_size: int | None = field(
        default=None, metadata={"help": "Envs played at the same time per process (None: the generation batch)."}
    )
    env_step_timeout: float = field(default=60.0, metadata={"help": "Seconds one env step may take."})
    env_log_episodes: bool = field(
        default=True, metadata={"help": "Write every episode's transcript to <output_dir>/_rollouts/."}
    )
    env_reuse_kv_cache: bool = field(
        default=True, metadata={"help": "Continue each turn from the last turn's KV cache (HF generate)."}
    )
    env_sample_layout: str | None = field(
        default=None,
        metadata={"help": "Rows of windowed episodes: 'step' (one per turn) or 'packed'.", "choices": list(LAYOUTS)},
    )
    env_updates_per_rollout: int | None = field(
        default=None, metadata={"help": "K optimizer steps per rollout, every row once (None: steps_per_generation)."}
    )
    env_advantage_baseline: str = field(
        default="episode",
        metadata={"help": "'episode' (GRPO groups) or 'rows' (verl-agent).", "choices": list(ADVANTAGE_BASELINES)},
    )
    env_forward_token_budget: int | None = field(
        default=16384, metadata={"help": "Tokens per forward/backward pass (rows are cut into chunks under it)."}
    )
    env_lr_per_rollout: bool = field(
        default=False,
        metadata={
            "help": "Step the LR schedule once per rollout (the reference code) instead of once per optimizer step."
        },
    )
    env_packed_mask_limit_gb: float = field(
        default=2.0, metadata={"help": "Refuse packed forwards whose dense attention mask exceeds this (GiB)."}
    )
    env_eval_temperature: float = field(
        default=0.4, metadata={"help": "Sampling temperature of the periodic evaluation (paper: 0.4)."}
    )
    env_eval_seeds: list[int] = field(
        default_factory=lambda: [0], metadata={"help": "Sampling seeds of the periodic evaluation."}
    )
    env_importance_sampling: str = field(
        default="token_truncate",
        metadata={
            "help": "vLLM importance-sampling correction of env rows (replaces vllm_importance_sampling_mode there).",
            "choices": list(IMPORTANCE_SAMPLING_MODES),
        },
    )
    env_advantage_estimator: str = field(
        default="grpo",
        metadata={
            "help": "'grpo' or 'gigpo' (+ anchor-state step advantages).",
            "choices": list(ADVANTAGE_ESTIMATORS),
        },
    )
    env_gigpo_gamma: float = field(default=0.95, metadata={"help": "GiGPO: discount of the step returns."})
    env_gigpo_step_weight: float = field(default=1.0, metadata={"help": "GiGPO: omega, weight of the step advantage."})
    env_gigpo_step_norm: str = field(
        default="mean_norm", metadata={"help": "GiGPO step normalisation.", "choices": list(STEP_NORMS)}
    )
    env_gigpo_similarity: float | None = field(
        default=None, metadata={"help": "GiGPO: merge anchors with a difflib ratio >= this (None: exact)."}
    )
    env_gigpo_anchor: str = field(
        default="env",
        metadata={
            "help": "GiGPO anchor key: 'env' (info['anchor']) or 'observation'.",
            "choices": list(ANCHOR_SOURCES),
        },
    )
    env_filter_groups: bool = field(
        default=False, metadata={"help": "Dynamic sampling: drop zero-variance groups, refill from extra rollouts."}
    )
    env_filter_max_rollouts: int = field(
        default=10, metadata={"help": "Rollouts per step at most with env_filter_groups (the first included)."}
    )
    env_max_failed_rollouts: int | None = field(
        default=3,
        metadata={"help": "Stop after this many consecutive rollouts whose every env failed (None: never)."},
    )

    # ---- preemption
    preemption_signals: list[str] = field(
        default_factory=lambda: ["SIGTERM"],
        metadata={
            "help": "Signals that make the trainer finish the step, checkpoint and exit with status 75 ([]: off)."
        },
    )

    def __post_init__(self):
        k = self.env_updates_per_rollout
        if k is not None:
            check_setting(isinstance(k, int) and k >= 1, "env_updates_per_rollout", k, "it must be an integer >= 1")
            if self.generation_batch_size is None and self.steps_per_generation is None:
                self.steps_per_generation = k * self.gradient_accumulation_steps
        super().__post_init__()
        self._check_epo_fields()

    def _check_epo_fields(self) -> None:
        """Validate the EPO and env fields on top of a validated GRPOConfig (also used by `trl_epo.trl_paths`'s
        GRPOConfig conversion, which does not rerun GRPOConfig's `__post_init__`)."""
        k = self.env_updates_per_rollout
        if k is not None and self.steps_per_generation != k * self.gradient_accumulation_steps:
            raise ValueError(
                f"`env_updates_per_rollout` = {k} needs steps_per_generation = K x gradient_accumulation_steps = "
                f"{k * self.gradient_accumulation_steps}, but it is {self.steps_per_generation}: episodes per rollout "
                "= per_device_train_batch_size x processes x K x gradient_accumulation_steps. Set "
                "per_device_train_batch_size accordingly and leave generation_batch_size / steps_per_generation unset."
            )
        self._validate_epo()
        RolloutConfig.from_args(self)  # validates the env_* settings (one place, one message style)
        check_setting(
            self.env_eval_temperature >= 0, "env_eval_temperature", self.env_eval_temperature, "it must be >= 0"
        )
        check_setting(bool(self.env_eval_seeds), "env_eval_seeds", self.env_eval_seeds, "give at least one seed")
        check_setting(
            self.env_importance_sampling in IMPORTANCE_SAMPLING_MODES,
            "env_importance_sampling",
            self.env_importance_sampling,
            f"use one of {IMPORTANCE_SAMPLING_MODES}",
        )
        resolve_layout(self.env_sample_layout, self.env_history_turns is not None)
        check_setting(
            self.env_advantage_baseline in ADVANTAGE_BASELINES,
            "env_advantage_baseline",
            self.env_advantage_baseline,
            f"use {ADVANTAGE_BASELINES}",
        )
        check_setting(
            self.env_forward_token_budget is None or self.env_forward_token_budget >= 1,
            "env_forward_token_budget",
            self.env_forward_token_budget,
            "it must be >= 1 or None",
        )
        resolve_signals(self.preemption_signals)  # a clear error for a signal that cannot preempt a run
        check_setting(
            self.env_max_failed_rollouts is None
            or (isinstance(self.env_max_failed_rollouts, int) and self.env_max_failed_rollouts >= 1),
            "env_max_failed_rollouts",
            self.env_max_failed_rollouts,
            "it must be an integer >= 1 or None",
        )
        check_setting(
            self.env_packed_mask_limit_gb > 0,
            "env_packed_mask_limit_gb",
            self.env_packed_mask_limit_gb,
            "it must be > 0",
        )
        check_gigpo_settings(self, check_setting)
        check_filter_settings(self.env_filter_max_rollouts, check_setting)

    @property
    def env_updates(self) -> int:
        """K: optimizer steps per rollout (steps_per_generation / gradient_accumulation_steps)."""
        return self.steps_per_generation // self.gradient_accumulation_steps

    def _validate_epo(self) -> None:
        choices = {
            "epo_smoothing": SMOOTHING_MODES,
            "epo_reference": REFERENCE_MODES,
            "epo_phase_schedule": PHASE_SCHEDULES,
            "epo_entropy_aggregation": AGGREGATIONS,
        }
        for name, allowed in choices.items():
            check_setting(getattr(self, name) in allowed, name, getattr(self, name), f"use {tuple(allowed)}")
        check_setting(
            self.epo_entropy_coef >= 0, "epo_entropy_coef", self.epo_entropy_coef, "it must be >= 0 (0: GRPO)"
        )
        check_setting(
            self.epo_smoothing_alpha >= 0, "epo_smoothing_alpha", self.epo_smoothing_alpha, "it must be >= 0"
        )
        check_setting(self.epo_kappa_low >= 0, "epo_kappa_low", self.epo_kappa_low, "it must be >= 0")
        check_setting(self.epo_kappa_high >= 0, "epo_kappa_high", self.epo_kappa_high, "it must be >= 0")
        check_setting(
            self.epo_kappa_low <= self.epo_kappa_high,
            "epo_kappa_low",
            self.epo_kappa_low,
            f"it must be <= epo_kappa_high ({self.epo_kappa_high})",
        )
        check_setting(
            0 <= self.epo_reference_ema_decay < 1,
            "epo_reference_ema_decay",
            self.epo_reference_ema_decay,
            "it must be in [0, 1)",
        )
        check_setting(
            isinstance(self.epo_reference_window, int) and self.epo_reference_window >= 1,
            "epo_reference_window",
            self.epo_reference_window,
            "it must be an integer >= 1",
        )
        check_setting(self.epo_phase_gamma >= 0, "epo_phase_gamma", self.epo_phase_gamma, "it must be >= 0")
        if self.epo_entropy_coef > 0 and (self.entropy_coef != 0 or self.use_adaptive_entropy):
            # Composed, not refused (a GRPOConfig with TRL's bonus stays a drop-in): TRL's term is part of L_base.
            warnings.warn(
                f"Both TRL's entropy bonus (entropy_coef={self.entropy_coef}, use_adaptive_entropy="
                f"{self.use_adaptive_entropy}: a token mean per micro-batch) and EPO's (epo_entropy_coef="
                f"{self.epo_entropy_coef}: Eq. 2's trajectory-level mean, with the smoothing corridor) are active; "
                "they add up. EPO's equivalent of TRL's static bonus is `epo_entropy_coef` with "
                "`epo_smoothing='none'` (EPO-Base) and `epo_entropy_aggregation='token'`: set `entropy_coef=0` and "
                "`use_adaptive_entropy=False` to train with EPO's terms alone, or `epo_entropy_coef=0` for TRL's alone.",
                stacklevel=3,
            )

    @property
    def epo_enabled(self) -> bool:
        return self.epo_entropy_coef > 0
