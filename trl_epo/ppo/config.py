"""EPOPPOConfig: EPOConfig plus the critic, GAE and the value loss of PPO + EPO."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import EPOConfig
from ..rollout.config import check_setting


@dataclass
class EPOPPOConfig(EPOConfig):
    r"""
    Configuration class for the [`EPOPPOTrainer`]: every [`EPOConfig`] field (the EPO terms, the multi-turn rollout,
    the row layouts) plus PPO's critic. The policy loss is TRL's clipped surrogate for `loss_type` (the reference's
    token mean is `"dapo"`), with per-token advantages from a learned critic and GAE over the action tokens instead of
    GRPO's group baseline; the EPO terms are unchanged (Xu et al., 2025, arXiv 2509.22576, Table 1's PPO + EPO rows).

    Groups are not needed: `num_generations` defaults to 1 (the paper's PPO plays 128 distinct tasks per step).
    GRPOConfig refuses fewer than 2 generations (GRPO's groups need them), so a config with `num_generations=1` is
    validated as the equivalent one with 2 generations and both batch sizes doubled (every other check is unchanged
    by that), then restored.

    Parameters:
        > Critic and GAE

        critic_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the critic's own optimizer (the policy's optimizer type, weight decay and LR schedule,
            stepped with the policy's); `None`: `learning_rate` (the reference uses the actor's rate: 3e-6
            ScienceWorld, 5e-6 ALFWorld).
        vf_coef (`float`, *optional*, defaults to `1.0`):
            Scale of the value loss. The critic has its own optimizer, so with Adam this matters only through gradient
            clipping (the reference's separate critic: 1.0; TRL's joint PPOTrainer uses 0.1).
        cliprange_value (`float` or `None`, *optional*, defaults to `0.5`):
            c of the clipped value loss ``1/2 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``, V_old the
            values the advantages were computed with (the reference's 0.5); `None`: the plain squared error.
        gamma (`float`, *optional*, defaults to `1.0`):
            Discount per action token (environment tokens take no step); the reference's 1.0.
        lam (`float`, *optional*, defaults to `1.0`):
            GAE's lambda; the reference's 1.0 (advantage = return - value).
        whiten_advantages (`bool`, *optional*, defaults to `True`):
            Whiten the advantages over the rollout's action tokens (all processes): zero mean, unit variance.
        critic_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Checkpoint the default critic is loaded from (backbone weights, a fresh value head); `None`: the policy's
            own checkpoint, or the policy's weights when it is given as a model object.
        critic_forward_token_budget (`int` or `None`, *optional*, defaults to `None`):
            Tokens (padding included) per critic forward/backward pass; `None`: the policy's
            `env_forward_token_budget`, so the critic trains on exactly the policy's chunks. A smaller budget is the
            reference's smaller critic micro-batch (a memory setting: the update does not change).
    """

    num_generations: int | None = field(
        default=1,
        metadata={"help": "Episodes per task in a rollout (PPO needs no groups: 1 plays distinct tasks)."},
    )
    critic_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the critic (None: learning_rate)."}
    )
    vf_coef: float = field(default=1.0, metadata={"help": "Scale of the value loss."})
    cliprange_value: float | None = field(
        default=0.5, metadata={"help": "Clip range of the value loss around the rollout's values (None: no clip)."}
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount per action token."})
    lam: float = field(default=1.0, metadata={"help": "GAE lambda."})
    whiten_advantages: bool = field(
        default=True, metadata={"help": "Whiten the advantages over the rollout's action tokens."}
    )
    critic_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint of the default critic (None: the policy's)."}
    )
    critic_forward_token_budget: int | None = field(
        default=None, metadata={"help": "Tokens per critic forward/backward pass (None: env_forward_token_budget)."}
    )

    def __post_init__(self):
        single = self.num_generations == 1
        if single:  # validate the equivalent 2-generation config (GRPOConfig requires >= 2), then restore
            self.num_generations = 2
            self.num_generations_eval = self.num_generations_eval or 1
            self.per_device_train_batch_size *= 2
            if self.generation_batch_size is not None:
                self.generation_batch_size *= 2
        super().__post_init__()
        if single:
            self.num_generations = 1
            self.per_device_train_batch_size //= 2
            self.generation_batch_size //= 2
        check_setting(
            self.critic_learning_rate is None or self.critic_learning_rate >= 0,
            "critic_learning_rate",
            self.critic_learning_rate,
            "it must be >= 0 or None",
        )
        check_setting(self.vf_coef > 0, "vf_coef", self.vf_coef, "it must be > 0")
        check_setting(
            self.cliprange_value is None or self.cliprange_value > 0,
            "cliprange_value",
            self.cliprange_value,
            "it must be > 0 or None",
        )
        check_setting(0 <= self.gamma <= 1, "gamma", self.gamma, "it must be in [0, 1]")
        check_setting(0 <= self.lam <= 1, "lam", self.lam, "it must be in [0, 1]")
        check_setting(
            self.critic_forward_token_budget is None or self.critic_forward_token_budget >= 1,
            "critic_forward_token_budget",
            self.critic_forward_token_budget,
            "it must be >= 1 or None",
        )
        check_setting(
            self.env_advantage_estimator == "grpo",
            "env_advantage_estimator",
            self.env_advantage_estimator,
            "EPOPPOTrainer's advantages come from its critic (GAE over the action tokens): leave it 'grpo'",
        )
        check_setting(
            not (self.env_filter_groups and self.num_generations < 2),
            "env_filter_groups",
            self.env_filter_groups,
            "dynamic sampling drops groups whose G episodes agree: it needs num_generations >= 2",
        )
        if self.fp16:
            raise ValueError(
                "EPOPPOTrainer's critic has no fp16 loss scaler: train in bf16 (`bf16=True`) or float32 instead."
            )

    @property
    def critic_lr(self) -> float:
        """The critic's learning rate (`critic_learning_rate`, else `learning_rate`)."""
        return self.learning_rate if self.critic_learning_rate is None else self.critic_learning_rate
