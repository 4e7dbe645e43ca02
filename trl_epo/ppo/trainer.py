"""EPOPPOTrainer: EPOTrainer with PPO's learned critic and GAE in place of GRPO's group baseline."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.utils import disable_dropout_in_model

from ..rollout import MultiTurnRollout
from ..rollout import env_reward as env_reward_func
from ..row_training import MicroBatch, lr_scheduler_of
from ..rows import TrainingRow, collate
from ..trainer import EPOTrainer
from . import gae as G
from .config import EPOPPOConfig
from .critic import (
    check_value_model,
    critic_from_policy,
    critic_from_pretrained,
    critic_values,
    enable_activation_checkpointing,
    with_lora,
)
from .critic_engine import CRITIC_DIR, CriticEngine


class EPOPPOTrainer(EPOTrainer):
    """PPO + EPO (Xu et al., 2025, arXiv 2509.22576, Table 1): the same rollout, row layouts, EPO terms, checkpoints and
    model card as [`EPOTrainer`], but each action token's advantage comes from a learned critic with GAE
    (`trl_epo.ppo.gae`): over the episode's action tokens only (environment and template tokens are skipped), the
    episode's reward on its last action token, an invalid turn's `env_invalid_action_penalty` on that turn's last
    token, whitened over the rollout. With one row per turn, GAE runs over the whole episode and is then split into
    its rows. `num_generations=1` (the default) plays distinct tasks; there are no groups.

    The critic (`value_model=`, or by default the policy's architecture with a scalar value head initialised from the
    policy; `trl_epo.ppo.critic`) has its own optimizer and LR schedule (`critic_learning_rate`). It is trained on the
    same rows and optimizer steps as the policy (K per rollout, gradient accumulation included) with PPO's clipped
    value loss (`vf_coef`, `cliprange_value`) as a token mean over each optimizer step, and is wrapped like the
    policy under DDP and DeepSpeed ZeRO-2/3 (`trl_epo.ppo.critic_engine`). Checkpoints carry it, its optimizer and
    its schedule (`checkpoint-N/critic/`); `save_model` writes it to `<output_dir>/critic`.

    Metrics: `critic/value_loss`, `critic/clipfrac`, `critic/grad_norm`, `critic/learning_rate` per optimizer step;
    `critic/explained_variance`, `critic/value_mean`, `critic/return_mean`, `critic/advantage_mean`,
    `critic/advantage_std` (before whitening) per rollout, from the values the advantages were computed with.

    Hooks overridden (TRL / transformers / EPOTrainer), and why:
        `_assign_advantages` (EPOTrainer): critic values and GAE instead of group advantages.
        `_score_rollout` (EPOTrainer): the value loss's per-token weights, normalised per optimizer step globally.
        `_train_micro_batch` (EPOTrainer): after the policy's chunks, the critic's chunks of the same rows, and its
            optimizer step after the last micro-step of each optimizer step.
        `_prepare_for_training` (transformers): prepares the critic once the policy is (its DeepSpeed engine must
            come second), and restores it when resuming.
        `save_model` / `_save_checkpoint` (transformers): save the critic, its optimizer and its LR schedule.
        `epo_run_summary` (EPOTrainer): records the PPO settings in `epo_run.json`.
    """

    _tag_names = ["trl", "ppo", "epo", "reinforcement-learning"]
    _name = "EPO-PPO"

    def __init__(self, model, reward_funcs=None, args: EPOPPOConfig | None = None, *pos, value_model=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = EPOPPOConfig(output_dir=f"{str(name).split('/')[-1]}-EPO-PPO")
        if not isinstance(args, EPOPPOConfig):
            raise TypeError(
                f"EPOPPOTrainer needs an EPOPPOConfig, got {type(args).__name__}. Build one with the same arguments: "
                "`EPOPPOConfig(**your_config.to_dict())` plus the critic settings."
            )
        if kwargs.get("env_factory") is None and not isinstance(kwargs.get("rollout_func"), MultiTurnRollout):
            raise ValueError(
                "EPOPPOTrainer trains on multi-turn environment rollouts: pass `env_factory=` (or "
                "`rollout_func=MultiTurnRollout(...)`) and a dataset of tasks."
            )
        if value_model is None:
            value_model = default_critic(model, args, kwargs.get("peft_config"), kwargs.get("quantization_config"))
        check_value_model(value_model)
        super().__init__(model, reward_funcs, args, *pos, **kwargs)
        if args.disable_dropout:
            disable_dropout_in_model(value_model)
        enable_activation_checkpointing(value_model, args)
        self.critic = CriticEngine(value_model)
        self._critic_sums: torch.Tensor | None = None  # the optimizer step's value loss and clipped share, so far

    # ---- advantages: critic values, GAE over each episode's action tokens, whitening over the rollout
    def _assign_advantages(self, rows: list[TrainingRow], rewards: torch.Tensor, batch) -> None:
        args, accelerator = self.args, self.accelerator
        self._row_values(rows)
        first = accelerator.process_index * len(batch.episodes)
        local_rewards = rewards[first : first + len(batch.episodes)].tolist()
        penalty = self._invalid_turn_penalty(batch)
        by_episode: dict[int, list[TrainingRow]] = {}
        for row in rows:
            by_episode.setdefault(row.episode, []).append(row)
        advantages, returns, values = [], [], []  # over the valid action tokens, for the statistics
        for index, episode_rows in by_episode.items():
            reward = local_rewards[index]
            valid = reward == reward  # NaN: an excluded env failure (no reward, no advantage, no value target)
            penalties = None
            if penalty:
                penalties = {t: penalty for t, action in enumerate(batch.episodes[index].actions) if action is None}
            row_advantages, row_returns = G.episode_gae(
                [row.env_mask for row in episode_rows],
                [row.turn_ids for row in episode_rows],
                [row.extra["old_values"] for row in episode_rows],
                float(reward) if valid else 0.0,
                penalties,
                args.gamma,
                args.lam,
            )
            for row, adv, ret in zip(episode_rows, row_advantages, row_returns):
                mask = [1.0 if (m and valid) else 0.0 for m in row.env_mask]
                row.advantage = [a * m for a, m in zip(adv, mask)]
                row.extra["returns"], row.extra["value_mask"] = ret, mask
                advantages.append([a for a, m in zip(adv, mask) if m])
                returns.append([r for r, m in zip(ret, mask) if m])
                values.append([v for v, m in zip(row.extra["old_values"], mask) if m])
        stats = torch.cat(
            [
                G.moments(advantages),
                G.explained_variance_sums([x for r in returns for x in r], [x for v in values for x in v]),
                torch.tensor([sum(map(sum, values))], dtype=torch.float64),
            ]
        )
        stats = accelerator.reduce(stats.to(accelerator.device), reduction="sum").cpu()
        mean, std = G.mean_and_std(stats[:3])
        if args.whiten_advantages:
            for row in rows:
                if any(row.extra["value_mask"]):
                    whitened = G.whiten(row.advantage, mean, std)
                    row.advantage = [w if m else 0.0 for w, m in zip(whitened, row.extra["value_mask"])]
        count = max(1.0, float(stats[3]))
        metrics = self._metrics["train"]
        explained = G.explained_variance(stats[3:8])
        if explained == explained:  # NaN when the returns do not vary: nothing to explain
            metrics["critic/explained_variance"].append(explained)
        metrics["critic/value_mean"].append(float(stats[8]) / count)
        metrics["critic/return_mean"].append(float(stats[4]) / count)
        metrics["critic/advantage_mean"].append(mean)
        metrics["critic/advantage_std"].append(std)

    def _row_values(self, rows: list[TrainingRow]) -> None:
        """The critic's values of every row (`row.extra["old_values"]`), in no-grad chunks (the same number on every
        process: ZeRO-3 gathers the critic's weights in every forward)."""
        pad = self.processing_class.pad_token_id
        with torch.no_grad():
            for chunk in self._chunks(rows, self.args.critic_forward_token_budget):
                inputs = collate(chunk, pad, self.accelerator.device)
                values = critic_values(
                    self.critic.wrapped, inputs, self._packed_block_marker, self.accelerator.autocast
                )
                for row, row_values in zip(chunk, values.tolist()):
                    if row.episode >= 0:
                        # a row's completion is the last len(completion) columns of the chunk's region (`collate`)
                        row.extra["old_values"] = row_values[len(row_values) - len(row.completion_ids) :]

    def _invalid_turn_penalty(self, batch) -> float:
        """The reward an invalid turn costs (`env_invalid_action_penalty` x the env reward's weight), or 0 when the
        env reward is not among the reward functions."""
        weights = self.reward_weights.tolist()
        for func, weight in zip(self.reward_funcs, weights):
            if func is env_reward_func:
                return float(batch.config.invalid_action_penalty) * weight
        return 0.0

    def _score_rollout(self, inputs: list[dict[str, Any]]) -> list[MicroBatch]:
        micro_batches = super()._score_rollout(inputs)
        # The value loss: a token mean over the rollout's value tokens (all processes) times K, so a token weighs the
        # same whichever of the K steps it lands in (as the policy's normalisers, `rows.rollout_step_counts`).
        accumulation = self.args.gradient_accumulation_steps
        steps = [micro_batches[k : k + accumulation] for k in range(0, len(micro_batches), accumulation)]
        local = torch.tensor(
            [sum(sum(r.extra["value_mask"]) for m in step for r in m.rows) for step in steps], dtype=torch.float64
        )
        totals = self.accelerator.reduce(local.to(self.accelerator.device), reduction="sum")
        totals = [float(totals.sum()) / len(steps)] * len(steps)
        for step, total in zip(steps, totals):
            for micro in step:
                for row in micro.rows:
                    row.extra["value_weights"] = [m / max(1.0, total) for m in row.extra["value_mask"]]
        return micro_batches

    # ---- training: the critic on the same rows as the policy
    def _train_micro_batch(self, model, micro: MicroBatch) -> torch.Tensor:
        final = self.accelerator.sync_gradients  # the optimizer steps after this micro-step
        loss = super()._train_micro_batch(model, micro)
        self._train_critic(micro, final)
        return loss

    def _train_critic(self, micro: MicroBatch, final: bool) -> None:
        args, accelerator, critic = self.args, self.accelerator, self.critic
        chunks = self._chunks(micro.rows, args.critic_forward_token_budget)
        sums = torch.zeros(2, device=accelerator.device)
        for i, chunk in enumerate(chunks):
            sync = final and i == len(chunks) - 1
            inputs = collate(chunk, self.processing_class.pad_token_id, accelerator.device)
            with critic.accumulate(sync):
                values = critic_values(critic.wrapped, inputs, self._packed_block_marker, accelerator.autocast)
                old, returns, weights = (
                    _pad_extra(chunk, key, accelerator.device) for key in ("old_values", "returns", "value_weights")
                )
                loss, clipped = G.clipped_value_loss(values, old, returns, weights, args.cliprange_value)
                loss = args.vf_coef * loss
                # Weights sum to 1 over the step's chunks on all processes; data parallelism averages the gradients.
                critic.backward(loss * accelerator.num_processes, sync)
            sums += torch.stack([loss.detach(), clipped])
        self._critic_sums = sums if self._critic_sums is None else self._critic_sums + sums
        if final:
            learning_rate = critic.learning_rate  # the rate of this step (the schedule steps after it)
            grad_norm = critic.step(args.max_grad_norm)
            totals = accelerator.reduce(self._critic_sums, reduction="sum").tolist()
            self._critic_sums = None
            metrics = self._metrics["train"]
            metrics["critic/value_loss"].append(totals[0])
            metrics["critic/clipfrac"].append(totals[1])
            metrics["critic/learning_rate"].append(learning_rate)
            if grad_norm is not None:
                metrics["critic/grad_norm"].append(grad_norm)

    # ---- preparing, saving and resuming the critic
    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if not self.critic.prepared:
            self.critic.prepare(
                self.accelerator,
                self._critic_optimizer,
                lambda optimizer: lr_scheduler_of(self.args, optimizer, max_steps),
            )
        if resume_from_checkpoint is not None:
            self.critic.load_state(resume_from_checkpoint)
        return model, train_dataloader

    def _critic_optimizer(self, critic) -> torch.optim.Optimizer:
        """The policy's optimizer type and weight decay (no decay on biases and norms, as `Trainer.create_optimizer`)
        at `critic_learning_rate`."""
        decay = set(self.get_decay_parameter_names(critic))
        named = [(n, p) for n, p in critic.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, critic)
        kwargs["lr"] = self.args.critic_lr
        return optimizer_cls([g for g in groups if g["params"]], **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """The policy (as `Trainer.save_model`) and the critic in `<output_dir>/critic`. Call it on every process."""
        super().save_model(output_dir, _internal_call)
        folder = os.path.join(output_dir or self.args.output_dir, CRITIC_DIR)
        self.critic.save_pretrained(folder, self.args.should_save)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)  # the critic's weights were saved by save_model
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.critic.save_state(folder, self.args.should_save)

    def epo_run_summary(self) -> dict:
        summary = super().epo_run_summary()
        fields = ("critic_learning_rate", "vf_coef", "cliprange_value", "gamma", "lam", "whiten_advantages")
        summary["ppo"] = {name: getattr(self.args, name) for name in fields}
        return summary


def default_critic(model, args: EPOPPOConfig, peft_config=None, quantization_config=None) -> torch.nn.Module:
    """The default critic: `critic_model_name_or_path`, else the policy's checkpoint (a policy given as a path), else
    the policy's weights (a policy given as a model object), with a fresh value head; a LoRA critic when the policy
    trains a LoRA adapter (`peft_config`, or a PEFT policy)."""
    set_seed(args.seed)  # the value head's initialisation
    path = args.critic_model_name_or_path or (model if isinstance(model, str) else None)
    critic = critic_from_pretrained(path, args, quantization_config) if path else critic_from_policy(model, args)
    lora = peft_config
    if lora is None and hasattr(model, "peft_config"):
        lora = next(iter(model.peft_config.values()))
    return with_lora(critic, lora) if lora is not None else critic


def _pad_extra(rows: list[TrainingRow], key: str, device) -> torch.Tensor:
    """A per-token row value (`row.extra[key]`, 0 where a row has none: filler rows) as a (B, C) tensor aligned as
    `trl_epo.rows.collate` aligns completions: a row's values fill the last ``len(values)`` columns."""
    width = max(len(r.completion_ids) for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, row in enumerate(rows):
        values = row.extra.get(key)
        if values:
            out[i, width - len(values) :] = torch.as_tensor(values, dtype=torch.float32)
    return out.to(device)
