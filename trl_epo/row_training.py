"""EPOTrainer's training on environment rows: score a rollout (rewards, advantages per episode), cut it into
training rows (`trl_epo.rows`), spread the rows over the rollout's K optimizer steps, and train every micro-step in
forward/backward chunks under a token budget. A mixin of `EPOTrainer` only.

Why not TRL's batch: TRL pads a generation batch into one tensor (every row as wide as the longest episode) and
expects one row per prompt. Here a rollout of N episodes becomes M rows (one per turn in the "step" layout), each
chunk is padded to its own longest row, and the losses are normalised with the step's global counts (all
micro-batches, all processes), so splitting a step into chunks changes nothing but the memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DistributedType, gather_object
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import RepeatSampler, nanstd, use_adapter

from . import row_buffer
from .gigpo import assign_gigpo, episode_turns
from .group_filter import filter_groups, refill_task_rows
from .importance import importance_ratios, mismatch_metrics, mismatch_sums
from .lr_schedule import lr_scheduler_of, per_rollout_schedule  # noqa: F401 (re-exported)
from .packing import check_packed_forward, packed_rows_one_per_forward
from .rows import (
    StepCounts,
    TrainingRow,
    collate,
    episode_rows,
    filler_row,
    group_advantages,
    resolve_layout,
    rollout_step_counts,
    schedule_rows,
    set_epo_weights,
    token_chunks,
)
from .sampling import EpochRepeatSampler, epochs_completed
from .seeding import derive_seed


ROW_BUFFER_NAME = "epo_rollout_buffer_rank{rank}.safetensors"  # `trl_epo.row_buffer`: tensors + JSON, no pickle
LEGACY_ROW_BUFFER_NAME = "epo_rollout_buffer_rank{rank}.pt"  # older releases' pickle: refused, never loaded
PER_SEQUENCE_LOSSES = ("grpo", "dr_grpo", "sapo", "luspo")  # TRL normalises these per row, then per micro-batch
PER_TOKEN_LOSSES = ("bnpo",)  # per action token of the micro-batch
GLOBAL_TOKEN_LOSSES = ("dapo", "cispo", "vespo")  # per action token of the step, through `num_items_in_batch`


@dataclass
class MicroBatch:
    """The rows of one micro-step and the global counts of its optimizer step."""

    rows: list[TrainingRow]
    counts: StepCounts


class RowTrainingMixin:
    """Training on environment rows (see the module docstring); active when the trainer has an env rollout."""

    _row_buffer: list[MicroBatch] | None = None
    _epoch_sampler: EpochRepeatSampler | None = None

    @property
    def _row_mode(self) -> bool:
        return getattr(self, "env_rollout", None) is not None

    @property
    def _layout(self) -> str:
        return resolve_layout(self.args.env_sample_layout, self.args.env_history_turns is not None)

    # ---- TRL hooks: the task order, a micro-step's inputs, and the micro-step itself
    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        if self._row_mode and isinstance(sampler, RepeatSampler):  # epoch e's order from (seed, e): resumable
            sampler = self._epoch_sampler = EpochRepeatSampler.of(sampler)
        return sampler

    def _prepare_inputs(self, generation_batch):
        if not self._row_mode or not self.model.training:
            return super()._prepare_inputs(generation_batch)
        cycle = self.args.steps_per_generation
        if self._step % (cycle * self.num_iterations) == 0 or self._row_buffer is None:
            self._row_buffer = self._score_rollout(generation_batch)
        return {"micro_batch": self._row_buffer[self._step % cycle]}

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._row_mode:
            return super().training_step(model, inputs, num_items_in_batch)
        start = time.perf_counter()
        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        micro: MicroBatch = self._prepare_inputs(inputs)["micro_batch"]
        loss = self._train_micro_batch(model, micro)
        self._step += 1
        self._current_train_step_time += time.perf_counter() - start
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
        return loss

    # ---- a micro-step: forward/backward chunks under the token budget
    def _chunks(self, rows: list[TrainingRow], token_budget: int | None = None) -> list[list[TrainingRow]]:
        """The rows in forward chunks of at most `token_budget` tokens (None: `env_forward_token_budget`), the same
        number on every process, chunk i with as many rows on every process (filler rows pad the short ones)."""
        budget = self.args.env_forward_token_budget if token_budget is None else token_budget
        if self._layout == "packed" and packed_rows_one_per_forward(self.model):
            chunks = [[row] for row in rows]
        else:
            chunks = [[rows[i] for i in c] for c in token_chunks([r.length for r in rows], budget)]
        count = torch.tensor([len(chunks)], device=self.accelerator.device)
        count = int(self.accelerator.gather(count).max().item()) if self.accelerator.num_processes > 1 else len(chunks)
        filler = filler_row(self.processing_class.pad_token_id)
        chunks = chunks + [[filler] for _ in range(max(1, count) - len(chunks))]
        if self.accelerator.num_processes > 1:
            # TRL's loss gathers one value per row (clip_ratio/low_min, high_max): chunk i needs as many rows on every
            # process, or the gather mismatches (gloo aborts) when processes hold different rows (a failed episode).
            sizes = torch.tensor([len(c) for c in chunks], device=self.accelerator.device)
            sizes = self.accelerator.gather(sizes).view(self.accelerator.num_processes, -1).amax(0).tolist()
            chunks = [c + [filler] * (int(n) - len(c)) for c, n in zip(chunks, sizes)]
        return chunks

    def _train_micro_batch(self, model, micro: MicroBatch) -> torch.Tensor:
        chunks = self._chunks(micro.rows)
        final = self.accelerator.sync_gradients  # the optimizer steps after this micro-step
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        total = torch.zeros((), device=self.accelerator.device)
        for i, chunk in enumerate(chunks):
            inputs = self._chunk_inputs(chunk, micro.counts)
            with self._gradient_sync(model, final and i == len(chunks) - 1):
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, inputs)
                self.accelerator.backward(loss, **({"scale_wrt_gas": False} if deepspeed else {}))
            total = total + loss.detach()
        return total

    @contextlib.contextmanager
    def _gradient_sync(self, model, sync: bool):
        """Gradients are reduced (and the optimizer steps) only after the last chunk of the last micro-step."""
        if sync:
            yield
            return
        state = self.accelerator.gradient_state
        previous = state.sync_gradients
        state._set_sync_gradients(False)
        try:
            no_sync = self.accelerator.distributed_type == DistributedType.MULTI_CPU or (
                self.accelerator.num_processes > 1 and self.accelerator.distributed_type != DistributedType.DEEPSPEED
            )
            with self.accelerator.no_sync(model) if no_sync else contextlib.nullcontext():
                yield
        finally:
            state._set_sync_gradients(previous)

    def _chunk_inputs(self, chunk: list[TrainingRow], counts: StepCounts) -> dict[str, Any]:
        """TRL's loss inputs for a chunk, with the factor that turns TRL's per-micro-batch normalisation into the
        step's global one (`row_loss_scale`)."""
        inputs = collate(chunk, self.processing_class.pad_token_id, self.accelerator.device)
        processes = self.accelerator.num_processes
        accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        real = [r for r in chunk if r.episode >= 0]
        if self.loss_type in GLOBAL_TOKEN_LOSSES:
            # TRL divides by num_items_in_batch / processes * accumulation / steps_per_generation: make it N_step / P.
            updates = self.args.steps_per_generation // accumulation
            inputs["num_items_in_batch"] = torch.tensor(counts.action_tokens * updates, device=self.accelerator.device)
            scale = 1.0 if real else 0.0
        elif self.loss_type in PER_TOKEN_LOSSES:
            scale = accumulation * sum(r.action_tokens for r in real) * processes / max(1.0, counts.action_tokens)
        else:
            scale = accumulation * len(real) * processes / max(1.0, counts.rows)
        inputs["row_loss_scale"] = scale
        inputs["row_step_action_tokens"] = counts.action_tokens  # TRL's entropy bonus: the step's token mean
        if self._vllm_is_correction:  # TRL's loss reads the ratio whenever the correction is on
            mask = inputs["completion_mask"] * inputs["tool_mask"]
            if "sampling_per_token_logps" in inputs and "old_per_token_logps" in inputs:
                inputs["importance_sampling_ratio"] = importance_ratios(
                    inputs["old_per_token_logps"],
                    inputs["sampling_per_token_logps"],
                    mask,
                    inputs["turn_ids"],
                    self.args.env_importance_sampling,  # multi-turn safe; replaces TRL's vllm_importance_sampling_mode
                    self.args.vllm_importance_sampling_clip_min,
                    self.args.vllm_importance_sampling_clip_max,
                )
            else:  # filler rows (no action token): nothing to correct
                inputs["importance_sampling_ratio"] = torch.ones_like(mask, dtype=torch.float32)
        if self._layout == "packed":
            check_packed_forward(self.model, inputs, self.args.env_packed_mask_limit_gb)
        return inputs

    @property
    def _vllm_is_correction(self) -> bool:
        return bool(self.use_vllm and self.vllm_importance_sampling_correction)

    # ---- a rollout: play, score, cut into rows, schedule
    def _score_rollout(self, inputs: list[dict[str, Any]]) -> list[MicroBatch]:
        args, accelerator = self.args, self.accelerator
        if args.env_filter_groups:  # dynamic sampling (`trl_epo.group_filter`): informative groups of extra rollouts
            played = []

            def play(task_rows):
                played.append(self._rollout_rows(task_rows))
                return played[-1][:2]

            def refill(attempt: int):
                seed = f"env_filter_groups/{args.seed}/{self.state.global_step}/{attempt}"
                rank = (accelerator.process_index, accelerator.num_processes)
                return refill_task_rows(self.train_dataset, len(inputs), self.num_generations, seed, *rank)

            rows, stats = filter_groups(
                play, inputs, refill, self.num_generations, args.env_filter_max_rollouts, accelerator.process_index
            )
            rewards = torch.cat([r for _, r, _ in played])
            self._last_rewards_per_func = torch.cat([p for _, _, p in played])
            for key, value in stats.metrics().items():
                self._metrics["train"][key].append(value)
        else:
            rows, rewards, _ = self._rollout_rows(inputs)
        updates = args.steps_per_generation // args.gradient_accumulation_steps
        deal = derive_seed(args.seed, self.state.global_step, accelerator.process_index)  # owned: no global RNG
        steps, local_counts = schedule_rows(rows, updates, args.gradient_accumulation_steps, seed=deal)
        counts = accelerator.reduce(local_counts.to(accelerator.device), reduction="sum").cpu()
        step_counts = rollout_step_counts(counts)
        for k, step in enumerate(steps):
            set_epo_weights([r for micro in step for r in micro], step_counts[k], args.epo_entropy_aggregation)
        if updates > 1 or self.num_iterations > 1 or self._vllm_is_correction:
            self._row_logps(rows, "old_logps", self.model)
            if self.use_vllm:
                self._log_vllm_mismatch(rows)
        if self.beta != 0.0:
            self._row_logps(rows, "ref_logps", self.ref_model)
        self._log_rows(rewards, rows, counts)
        return [MicroBatch(micro, step_counts[k]) for k, step in enumerate(steps) for micro in step]

    def _rollout_rows(self, inputs: list[dict[str, Any]]) -> tuple[list[TrainingRow], torch.Tensor, torch.Tensor]:
        """Play one rollout of this process's task rows; its rows with their advantages, all processes' rewards, and
        the rewards per reward function."""
        batch = self._play_rollout_batch(inputs)
        self._packed_block_marker = batch.block_marker if self._layout == "packed" else None
        rewards = self._episode_rewards(inputs, batch)
        rows: list[TrainingRow] = []
        for i, e in enumerate(batch.episodes):
            rows += episode_rows(i, e.prompt_ids, e.completion_ids, e.env_mask, e.turn_ids, e.logprobs, self._layout)
        self._assign_advantages(rows, rewards, batch)
        return rows, rewards, self._last_rewards_per_func

    def _assign_advantages(self, rows: list[TrainingRow], rewards: torch.Tensor, batch) -> None:
        """GRPO: each episode's advantage from its group's baseline (`env_advantage_baseline`), on all its rows.
        `rewards` holds all processes' episodes in TRL's order; `rows` are this process's. A critic-based trainer
        overrides this (per-token advantages: a list per row)."""
        accelerator, gigpo = self.accelerator, self.args.env_advantage_estimator == "gigpo"
        # the "rows" baseline weighs an episode by its turns (= its rows in the step layout) in every layout, so that
        # the layouts agree (one packed row per episode must not make it the episode baseline)
        local_rows = torch.tensor(
            [max(1, e.turns) for e in batch.episodes],
            dtype=torch.float32,
            device=accelerator.device,
        )
        advantages = group_advantages(
            rewards,
            self.num_generations,
            self.scale_rewards,
            self.args.env_advantage_baseline,
            accelerator.gather(local_rows),
        )
        first = accelerator.process_index * len(batch.episodes)
        if gigpo:  # per-turn advantages (`trl_epo.gigpo`) from all processes' turns
            turns = episode_turns(batch.episodes, self.args.env_gigpo_anchor)
            turns = gather_object(turns) if accelerator.num_processes > 1 else turns
            penalty = batch.config.invalid_action_penalty
            stats = assign_gigpo(rows, rewards, advantages, turns, first, self.num_generations, self.args, penalty)
            for key, value in stats.metrics().items():
                self._metrics["train"][key].append(value)
            return
        local = advantages[first : first + len(batch.episodes)].tolist()
        for row in rows:
            row.advantage = local[row.episode]

    def _episode_rewards(self, inputs, batch) -> torch.Tensor:
        """Each episode's reward from the trainer's reward functions (the env reward by default), all processes'
        episodes in TRL's order; NaN where every function returned None (e.g. an excluded env failure)."""
        extra = batch.trl_output()
        fields = {k: v for k, v in extra.items() if k not in ("prompt_ids", "completion_ids", "logprobs")}
        reward_inputs = [dict(x, **{k: v[i] for k, v in fields.items()}) for i, x in enumerate(inputs)]
        prompts = [x["prompt"] for x in inputs]
        completions = [e.messages[_first_answer(e.messages) :] for e in batch.episodes]
        per_func = self._calculate_rewards(
            reward_inputs, prompts, completions, [e.completion_ids for e in batch.episodes]
        )
        self._last_rewards_per_func = per_func
        unscorable = torch.isnan(per_func).all(dim=1)
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable] = torch.nan
        return rewards

    def _row_logps(self, rows: list[TrainingRow], attribute: str, model) -> None:
        """Per-token logprobs of every row under `model` (None: this trainer's policy without its adapter, TRL's
        reference for PEFT), in no-grad forward chunks under the token budget."""
        chunks = self._chunks(rows)
        target = model if model is not None else self.model
        unwrapped = self.accelerator.unwrap_model(self.model)
        adapter = contextlib.nullcontext()
        if model is None:
            if not hasattr(unwrapped, "peft_config"):
                raise ValueError("beta > 0 needs a reference model (or a PEFT adapter to disable).")
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter,
        ):
            for chunk in chunks:
                inputs = collate(chunk, self.processing_class.pad_token_id, self.accelerator.device)
                if self._layout == "packed":
                    check_packed_forward(self.model, inputs, self.args.env_packed_mask_limit_gb)
                ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
                mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
                logps, _, _ = self._get_per_token_logps_and_entropies(
                    target, ids, mask, inputs["completion_ids"].size(1)
                )
                for row, values in zip(chunk, logps.float().tolist()):
                    if row.episode >= 0:
                        setattr(row, attribute, values[len(values) - len(row.completion_ids) :])

    def _log_vllm_mismatch(self, rows: list[TrainingRow]) -> None:
        """`vllm/*`: the per-token trainer-vs-vLLM logprob gap of the rollout's action tokens (overall and per turn)
        and the importance-sampling correction it gets (`trl_epo.importance`), over all processes."""
        args = self.args
        sums, largest = mismatch_sums(
            rows,
            self.env_rollout.config.max_turns,
            args.env_importance_sampling,
            args.vllm_importance_sampling_clip_min,
            args.vllm_importance_sampling_clip_max,
        )
        sums = self.accelerator.reduce(sums.to(self.accelerator.device), reduction="sum").cpu()
        largest = self.accelerator.gather(torch.tensor([largest], device=self.accelerator.device)).max().item()
        for key, value in mismatch_metrics(sums, largest).items():
            self._metrics["train"][key].append(value)

    def _log_rows(self, rewards, rows, counts) -> None:
        metrics = self._metrics["train"]
        per_func = self._last_rewards_per_func
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(per_func[:, i]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(per_func[:, i]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        if self.num_generations > 1:  # groups (GRPO): the share whose rewards all agree (advantage 0)
            grouped = rewards.view(-1, self.num_generations)
            zero_std = (nanstd(grouped, dim=1) == 0) | torch.isnan(nanstd(grouped, dim=1))
            metrics["frac_reward_zero_std"].append(zero_std.float().mean().item())
        metrics["rollout/rows"].append(float(counts[:, 0].sum()))
        metrics["rollout/action_tokens"].append(float(counts[:, 1].sum()))

    # ---- the learning-rate schedule, and resuming inside a rollout
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None or not per_rollout_schedule(self.args):
            return super().create_scheduler(num_training_steps, optimizer)
        scheduler = lr_scheduler_of(self.args, optimizer or self.optimizer, num_training_steps)
        self.lr_scheduler, self._created_lr_scheduler = scheduler, True
        return scheduler

    def _save_row_buffer(self, folder: str) -> None:
        """Inside a rollout's K updates, the rollout's remaining micro-batches go into the checkpoint (one file per
        process), so that a resumed run trains on exactly the rows the uninterrupted one would."""
        # A rollout lasts K updates times TRL's num_iterations passes over its rows.
        cycle = self.args.steps_per_generation * self.num_iterations
        if not self._row_mode or self._row_buffer is None or self._step % cycle == 0:
            return
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, ROW_BUFFER_NAME.format(rank=self.accelerator.process_index))
        row_buffer.save(path, self._step, self._row_buffer)

    def _load_row_buffer(self, checkpoint: str) -> None:
        if not self._row_mode:
            return
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            trainer_state = json.load(f)
        global_step = trainer_state["global_step"]
        if self._epoch_sampler is not None:  # the resumed epoch's task order (also where set_epoch cannot reach it)
            self._epoch_sampler.set_epoch(epochs_completed(trainer_state.get("epoch") or 0.0))
        self._step = global_step * self.args.gradient_accumulation_steps
        if self._step % (self.args.steps_per_generation * self.num_iterations) == 0:
            return
        path = os.path.join(checkpoint, ROW_BUFFER_NAME.format(rank=self.accelerator.process_index))
        legacy = os.path.join(checkpoint, LEGACY_ROW_BUFFER_NAME.format(rank=self.accelerator.process_index))
        if not os.path.exists(path) and os.path.exists(legacy):
            raise ValueError(
                f"{legacy} is a pickled row buffer (older trl_epo); loading it could run arbitrary code, so it is not "
                "loaded. Resume from a checkpoint at a rollout boundary, or one written by this version."
            )
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{checkpoint} was saved inside a rollout (step {global_step} of a rollout of "
                f"{self.args.steps_per_generation // self.args.gradient_accumulation_steps * self.num_iterations} "
                f"updates) but {path} is "
                "missing, so the rollout's remaining rows are lost. Resume from a checkpoint at a rollout boundary, or "
                "with the same number of processes that wrote this one."
            )
        _, micro_batches = row_buffer.load(path)
        self._row_buffer = [MicroBatch(rows, counts) for rows, counts in micro_batches]


def _first_answer(messages: list[dict[str, str]]) -> int:
    """Index of the first assistant message (the completion of an episode starts there)."""
    return next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
