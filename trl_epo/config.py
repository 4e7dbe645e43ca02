"""EPOConfig: GRPOConfig plus the settings of the EPO objective."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig


SMOOTHING_MODES = ("hinge", "none")
REFERENCE_MODES = ("cumulative", "per_turn", "ema", "window")
PHASE_SCHEDULES = ("exp", "constant")
AGGREGATIONS = ("trajectory", "token")


@dataclass
class EPOConfig(GRPOConfig):
    r"""
    Configuration for [`EPOTrainer`]: every [`~trl.GRPOConfig`] field plus the EPO objective (Xu et al., 2025,
    arXiv 2509.22576, Eq. 6):

        L = L_base - epo_entropy_coef * L_H + epo_entropy_coef * beta_k * L_smooth

    `L_base` is TRL's GRPO loss for `loss_type`; `L_H` is the trajectory-level entropy of the action tokens (Eq. 2);
    `L_smooth` is `epo_smoothing_alpha` times the same aggregation of the hinge penalty that keeps token entropy in
    the corridor `[epo_kappa_low * H_ref, epo_kappa_high * H_ref]` around the historical reference `H_ref`
    (Eqs. 3-4); `beta_k` is the phase weight (Eq. 5).

    Relation to TRL's own entropy bonus: `epo_entropy_coef` *replaces* GRPOConfig's `entropy_coef`. TRL's bonus is a
    plain token mean; EPO's is the trajectory-level mean. Setting both (or `use_adaptive_entropy`) while
    `epo_entropy_coef > 0` raises a `ValueError`, so the entropy is never counted twice. With `epo_entropy_coef=0`
    the EPO terms vanish and the trainer is exactly `GRPOTrainer` (TRL's `entropy_coef` then works as usual).

    Defaults follow the paper (lambda = 1e-3, kappa_l = 0, kappa_r = 2, gamma = 3, alpha = 0.1 as on ALFWorld; the
    paper uses 0.05 on ScienceWorld).
    """

    epo_entropy_coef: float = field(
        default=1e-3,
        metadata={
            "help": "lambda: weight of the trajectory-level entropy bonus L_H and of the smoothing term (Eq. 6). "
            "0 disables EPO entirely (the trainer then equals GRPOTrainer). Replaces GRPOConfig's `entropy_coef`; "
            "setting both raises an error."
        },
    )
    epo_smoothing: str = field(
        default="hinge",
        metadata={
            "help": "Entropy smoothing: 'hinge' (paper v2, differentiable corridor penalty, Eqs. 3-4) or 'none' "
            "(EPO-Base: entropy bonus only).",
            "choices": list(SMOOTHING_MODES),
        },
    )
    epo_smoothing_alpha: float = field(
        default=0.1,
        metadata={"help": "alpha: weight of the corridor penalty (paper: 0.05 ScienceWorld, 0.1 ALFWorld)."},
    )
    epo_kappa_low: float = field(
        default=0.0,
        metadata={"help": "kappa_l: lower corridor bound as a multiple of the entropy reference (paper: 0)."},
    )
    epo_kappa_high: float = field(
        default=2.0,
        metadata={"help": "kappa_r: upper corridor bound as a multiple of the entropy reference (paper: 2)."},
    )
    epo_reference: str = field(
        default="cumulative",
        metadata={
            "help": "Entropy reference H_ref: 'cumulative' (paper: mean of all previous steps' batch entropies), "
            "'per_turn' (a cumulative reference per true turn index), 'ema' or 'window'.",
            "choices": list(REFERENCE_MODES),
        },
    )
    epo_reference_ema_decay: float = field(
        default=0.9,
        metadata={"help": "Decay d of the 'ema' reference: H_ref <- d * H_ref + (1 - d) * H_k. Range [0, 1)."},
    )
    epo_reference_window: int = field(
        default=10,
        metadata={"help": "Number of recent optimizer steps averaged by the 'window' reference (>= 1)."},
    )
    epo_phase_schedule: str = field(
        default="exp",
        metadata={
            "help": "Phase weight beta_k: 'exp' (beta_k = 1 + exp(-gamma * k / floor(K/2)), Eq. 5, K = the run's "
            "total optimizer steps) or 'constant' (beta = 1).",
            "choices": list(PHASE_SCHEDULES),
        },
    )
    epo_phase_gamma: float = field(
        default=3.0,
        metadata={"help": "gamma of the phase weight (Eq. 5); >= 0."},
    )
    epo_entropy_aggregation: str = field(
        default="trajectory",
        metadata={
            "help": "How per-token entropies are averaged: 'trajectory' (Eq. 2: token mean per turn, mean over "
            "turns, mean over trajectories) or 'token' (plain mean over all action tokens).",
            "choices": list(AGGREGATIONS),
        },
    )

    # ---- multi-turn environment rollouts (used when EPOTrainer gets `env_factory=`)
    env_max_turns: int = field(
        default=30,
        metadata={"help": "Maximum turns per episode (paper: 30 ScienceWorld, 50 ALFWorld)."},
    )
    env_max_turn_tokens: int = field(
        default=512,
        metadata={
            "help": "Maximum new tokens the model generates in one turn (paper: 512). The whole episode (generated "
            "and environment tokens) is bounded by `max_completion_length`."
        },
    )
    env_history_turns: int | None = field(
        default=None,
        metadata={
            "help": "None: the whole episode stays in context (one growing conversation; exact and cache-friendly). "
            "k >= 0: the paper's windowed prompts (task + last k (observation, action) pairs + current observation, "
            "paper: k = 2); per-turn blocks are packed into one training row with positions and attention restarted "
            "per block. Set `max_completion_length` to the packed row budget."
        },
    )
    env_reward: str = field(
        default="success",
        metadata={
            "help": "Episode reward: 'success' (1 if won), 'score' (env score / 100) or 'won10' (10 * won, the "
            "paper's code).",
            "choices": ["success", "score", "won10"],
        },
    )
    env_invalid_action_penalty: float = field(
        default=0.0,
        metadata={"help": "Subtracted from the episode reward per invalid (unparsable) turn (paper's code: 0.1)."},
    )
    env_error_reward: str = field(
        default="zero",
        metadata={
            "help": "An episode whose env raised, hung or died: 'zero' (reward 0) or 'exclude' (no reward: advantage "
            "0 and left out of its group's baseline).",
            "choices": ["zero", "exclude"],
        },
    )
    env_action_tag: str = field(
        default="action",
        metadata={"help": "The agent answers inside <tag>...</tag>; an answer without it is an invalid turn."},
    )
    env_instruction: str | None = field(
        default=None,
        metadata={"help": "System instruction for the agent ('{example}' is replaced with an example action)."},
    )
    env_show_admissible_actions: bool = field(
        default=True,
        metadata={"help": "List the env's admissible actions in each observation, when the env gives them."},
    )
    env_max_observation_chars: int = field(
        default=4000,
        metadata={"help": "Observations longer than this many characters are cut (with a note) in prompts."},
    )
    env_pool_backend: str = field(
        default="process",
        metadata={
            "help": "How envs are stepped in parallel: 'process' (a worker process per env, with timeouts and crash "
            "recovery), 'thread' (thread-safe pure-Python envs) or 'inline'.",
            "choices": ["process", "thread", "inline"],
        },
    )
    env_pool_size: int | None = field(
        default=None,
        metadata={
            "help": "Envs (episodes) played at the same time per process; default: the whole local generation "
            "batch (generation_batch_size / num_processes), each env in its own worker process. Smaller values play "
            "the batch in waves (less memory: a ScienceWorld env holds a ~0.45 GB JVM; fewer sequences per generate "
            "call)."
        },
    )
    env_step_timeout: float = field(
        default=60.0,
        metadata={"help": "Seconds one env step may take before its episode is failed and its worker restarted."},
    )
    env_log_episodes: bool = field(
        default=True,
        metadata={
            "help": "Write every episode's transcript to <output_dir>/_rollouts/*.jsonl (not uploaded by push_to_hub)."
        },
    )
    env_reuse_kv_cache: bool = field(
        default=True,
        metadata={
            "help": "With HF generate (not vLLM) and full contexts (env_history_turns=None), continue each turn from "
            "the previous turn's KV cache instead of re-encoding the whole conversation. Sampling is unchanged; it is "
            "skipped automatically where it could not be exact (repetition penalty, non-dynamic caches). The cache is "
            "kept between turns and, with its masked holes, may grow to 2x a fresh encoding's before it is rebuilt; "
            "turn it off if generation memory is tight."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate_epo()
        self._validate_env()

    def _validate_env(self) -> None:
        def need(condition: bool, name: str, allowed: str) -> None:
            if not condition:
                raise ValueError(f"`{name}` = {getattr(self, name)!r} is invalid: {allowed}.")

        need(self.env_max_turns >= 1, "env_max_turns", "it must be >= 1")
        need(self.env_max_turn_tokens >= 1, "env_max_turn_tokens", "it must be >= 1")
        need(
            self.env_history_turns is None or self.env_history_turns >= 0,
            "env_history_turns",
            "it must be None (full context) or an integer >= 0",
        )
        need(self.env_reward in ("success", "score", "won10"), "env_reward", "use 'success', 'score' or 'won10'")
        need(self.env_invalid_action_penalty >= 0, "env_invalid_action_penalty", "it must be >= 0")
        need(self.env_error_reward in ("zero", "exclude"), "env_error_reward", "use 'zero' or 'exclude'")
        need(
            self.env_pool_backend in ("process", "thread", "inline"),
            "env_pool_backend",
            "use 'process', 'thread' or 'inline'",
        )
        need(self.env_pool_size is None or self.env_pool_size >= 1, "env_pool_size", "it must be >= 1 or None")
        need(self.env_step_timeout > 0, "env_step_timeout", "it must be > 0 seconds")
        need(self.env_max_observation_chars >= 1, "env_max_observation_chars", "it must be >= 1")

    def _validate_epo(self) -> None:
        def need(condition: bool, name: str, allowed: str) -> None:
            if not condition:
                raise ValueError(f"`{name}` = {getattr(self, name)!r} is invalid: {allowed}.")

        need(self.epo_entropy_coef >= 0, "epo_entropy_coef", "it must be >= 0 (use 0 to disable EPO)")
        need(self.epo_smoothing in SMOOTHING_MODES, "epo_smoothing", f"allowed values are {SMOOTHING_MODES}")
        need(self.epo_smoothing_alpha >= 0, "epo_smoothing_alpha", "it must be >= 0")
        need(self.epo_kappa_low >= 0, "epo_kappa_low", "it must be >= 0")
        need(self.epo_kappa_high >= 0, "epo_kappa_high", "it must be >= 0")
        need(
            self.epo_kappa_low <= self.epo_kappa_high,
            "epo_kappa_low",
            f"it must be <= epo_kappa_high ({self.epo_kappa_high})",
        )
        need(self.epo_reference in REFERENCE_MODES, "epo_reference", f"allowed values are {REFERENCE_MODES}")
        need(0 <= self.epo_reference_ema_decay < 1, "epo_reference_ema_decay", "it must be in [0, 1)")
        need(
            isinstance(self.epo_reference_window, int) and self.epo_reference_window >= 1,
            "epo_reference_window",
            "it must be an integer >= 1",
        )
        need(self.epo_phase_schedule in PHASE_SCHEDULES, "epo_phase_schedule", f"allowed values are {PHASE_SCHEDULES}")
        need(self.epo_phase_gamma >= 0, "epo_phase_gamma", "it must be >= 0")
        need(
            self.epo_entropy_aggregation in AGGREGATIONS,
            "epo_entropy_aggregation",
            f"allowed values are {AGGREGATIONS}",
        )
        if self.epo_entropy_coef > 0 and (self.entropy_coef != 0 or self.use_adaptive_entropy):
            raise ValueError(
                f"`epo_entropy_coef` = {self.epo_entropy_coef} and TRL's `entropy_coef` = {self.entropy_coef} "
                f"(use_adaptive_entropy={self.use_adaptive_entropy}) would both add an entropy bonus. EPO's "
                "trajectory-level bonus replaces TRL's: set `entropy_coef=0` and `use_adaptive_entropy=False`, or set "
                "`epo_entropy_coef=0` to train plain GRPO with TRL's bonus."
            )

    @property
    def epo_enabled(self) -> bool:
        return self.epo_entropy_coef > 0
