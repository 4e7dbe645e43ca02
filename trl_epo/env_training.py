"""The environment side of `EPOTrainer`: multi-turn rollouts through TRL's `rollout_func` hook and periodic
evaluation on task splits. A mixin of `EPOTrainer` only (it reads the trainer's `args`, `accelerator`, model and
state, and logs through TRL's metrics); the rollout itself (`trl_epo.rollout`) never sees the trainer.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import torch

from .envs.base import TaskSpec
from .evaluation import evaluation_result, play_episodes, sampling_config
from .results import save_eval_results
from .rollout import MultiTurnRollout, RolloutBatch, RolloutConfig, RolloutStats, TrainerGenerator, TrainerPolicy
from .rollout.config import rollout_record
from .rollout.vllm import engine_context_limit, sampling_overrides
from .run_files import ROLLOUT_LOG_DIR


class EnvTrainingMixin:
    """Rollouts and evaluation with an environment (`env_rollout`, a `MultiTurnRollout`, or None)."""

    env_rollout: MultiTurnRollout | None = None
    _rollout_env: str | None = None  # the env the rollout config was resolved for
    _packed_block_marker: list[int] | None = None
    _rollouts_played = 0
    _failed_rollouts = 0  # consecutive training rollouts in which every episode's env failed
    _vllm_context_limit: tuple[int | None] | None = None  # the engine's max model length, asked once

    # ---- rollouts
    def rollout_policy(self, generation_config=None) -> TrainerPolicy:
        """What a rollout needs to generate with this trainer's policy (explicit values; nothing is written back).
        `generation_config`: sampling settings other than training's (evaluation), for HF generate and vLLM alike.
        Collective with vLLM in server mode (the first call asks the server for its maximum model length)."""
        use_vllm = bool(self.use_vllm)
        backend = getattr(self, "vllm_generation", None) if use_vllm else None
        if backend is not None and self._vllm_context_limit is None:
            self._vllm_context_limit = (engine_context_limit(backend, self.accelerator),)
        return TrainerPolicy(
            model_wrapped=self.model_wrapped,
            accelerator=self.accelerator,
            # with vLLM, TRL builds no GenerationConfig: the backend keeps TRL's sampling settings
            generation_config=generation_config or getattr(self, "generation_config", None),
            eos_token_ids=list(self.eos_token_ids),
            pad_token_id=self.processing_class.pad_token_id,
            max_completion_length=self.max_completion_length,
            use_vllm=use_vllm,
            vllm_generation=backend,
            sync_weights=self._sync_vllm_weights if use_vllm else None,
            max_context_tokens=self._vllm_context_limit[0] if backend is not None else None,
            vllm_sampling=sampling_overrides(generation_config),
            ds3_gather_for_generation=self.args.ds3_gather_for_generation,
            generation_kwargs=getattr(self, "generation_kwargs", None) or {},
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            full_params=functools.partial(self._dist.summon_full_params, self.model_wrapped, recurse=False),
        )

    def _sync_vllm_weights(self, force: bool = False) -> bool:
        """Push the training weights to vLLM when they changed since the last push (or always with `force`: a sleeping
        engine discarded them); every process calls it (ZeRO-3 gathers). Returns whether it pushed."""
        if not force and self.state.global_step == self._last_loaded_step:
            return False
        self.vllm_generation.sync_weights()
        self._last_loaded_step = self.state.global_step
        return True

    def _rollout_config(self, tasks: list[TaskSpec]) -> RolloutConfig:
        """The rollout settings, resolved once from `args` and the env's registry defaults."""
        if self.env_rollout.config is None:
            env = tasks[0].env if tasks else None
            self.env_rollout.config = RolloutConfig.from_args(self.args, env=env)
        if self._rollout_env is None and tasks:
            self._rollout_env = tasks[0].env
        return self.env_rollout.config

    def _play_rollout_batch(self, rows: list[dict[str, Any]]) -> RolloutBatch:
        """Play one episode per task row (the generation batch TRL's sampler hands this process: the G members of a
        group are consecutive), log the rollout, return it."""
        tasks = [TaskSpec.from_row(row) for row in rows]
        config = self._rollout_config(tasks)
        batch = self.env_rollout.play(tasks, TrainerGenerator(self.rollout_policy(), config), self.processing_class)
        self._log_rollout(batch)
        return batch

    def _log_rollout(self, batch: RolloutBatch) -> None:
        mode = "train" if self.model.training else "eval"
        local = torch.tensor(batch.stats.to_list(), dtype=torch.float64, device=self.accelerator.device)
        total = RolloutStats.from_list(self.accelerator.reduce(local, reduction="sum").tolist())
        for key, value in total.metrics(self.accelerator.num_processes).items():
            self._metrics[mode][key].append(float(value))
        if mode == "train":
            self._check_failed_rollouts(total, batch)
        if self.args.env_log_episodes:
            name = f"{mode}_step{self.state.global_step:06d}_batch{self._rollouts_played:05d}"
            path = os.path.join(self.args.output_dir, ROLLOUT_LOG_DIR, f"{name}_rank{self.accelerator.process_index}")
            batch.write_transcripts(path + ".jsonl")
        self._rollouts_played += 1

    def _check_failed_rollouts(self, total: RolloutStats, batch: RolloutBatch) -> None:
        """Stop after `env_max_failed_rollouts` consecutive rollouts in which every episode's env failed (all
        processes' episodes; the same decision on every process): such a run would train on nothing but warnings."""
        failed = total.episodes > 0 and total.env_error_episodes == total.episodes
        self._failed_rollouts = self._failed_rollouts + 1 if failed else 0
        limit = self.args.env_max_failed_rollouts
        if limit and self._failed_rollouts >= limit:
            errors = [e.env_error for e in batch.episodes if e.env_error is not None]
            raise RuntimeError(
                f"The last {self._failed_rollouts} rollouts failed in every episode: every environment raised (e.g. "
                f"{str(errors[0]).splitlines()[0][:300] if errors else 'on another process'!r}), so training has nothing to learn "
                "from. Check the environment with `trl_epo.envs.checker.check_text_env(env, task)`; "
                "env_max_failed_rollouts sets how many such rollouts in a row stop the run (None: never)."
            )

    def rollout_record(self) -> dict[str, Any] | None:
        """The resolved rollout settings, as `trl-epo evaluate` reads them back from `epo_run.json`."""
        if self.env_rollout is None or self.env_rollout.config is None:
            return None
        return rollout_record(self.env_rollout.config, self._rollout_env, self.env_rollout.env_factory)

    def close_envs(self) -> None:
        """Stop the environment workers (they restart on the next rollout)."""
        if self.env_rollout is not None:
            self.env_rollout.close()

    # ---- TRL hook: evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """With an environment: play every eval split's tasks (once per `env_eval_seeds` seed) at
        `env_eval_temperature`, distributed over processes, and log `eval/<split>/success_rate` (with its Wilson
        interval, `eval/<split>/success_ci_low|high`). Without one: TRL's evaluation."""
        if self.env_rollout is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if datasets is None:
            raise ValueError("Nothing to evaluate: pass `eval_dataset` (task rows, or a dict split -> task rows).")
        if not isinstance(datasets, dict):
            split = datasets["split"][0] if "split" in getattr(datasets, "column_names", []) else "eval"
            datasets = {split: datasets}
        was_training = self.model.training
        self.model.eval()
        try:
            metrics = {}
            for split, dataset in datasets.items():
                metrics.update(self._evaluate_split(split, [TaskSpec.from_row(row) for row in dataset]))
            self.log(dict(metrics))
        finally:
            self.model.train(was_training)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _evaluate_split(self, split: str, tasks: list[TaskSpec]) -> dict[str, float]:
        args, accelerator = self.args, self.accelerator
        config = self._rollout_config(tasks)
        pad_id = self.processing_class.pad_token_id
        sampling = sampling_config(self.eos_token_ids, pad_id, args.env_eval_temperature)
        sampling.max_new_tokens = config.max_turn_tokens
        generator = TrainerGenerator(self.rollout_policy(sampling), config)
        per_process = -(-len(tasks) // accelerator.num_processes)
        start = time.perf_counter()
        with generator:  # one engine session (one weight sync, one sleep) for all of the split's rollouts
            records = play_episodes(
                self.env_rollout,
                generator,
                self.processing_class,
                tasks,
                args.env_eval_seeds,
                batch_size=max(1, per_process),
                process_index=accelerator.process_index,
                num_processes=accelerator.num_processes,
                gather=_gather_object if accelerator.num_processes > 1 else None,
            )
        settings = {"temperature": args.env_eval_temperature, "step": self.state.global_step}
        result = evaluation_result(
            records,
            tasks[0].env,
            split,
            args.output_dir,
            args.env_eval_seeds,
            len({(t.task, t.variation, t.seed) for t in tasks}),
            {"split_size": len(tasks), "selection": "eval_dataset"},
            settings,
            time.perf_counter() - start,
            return_episodes=False,
        )
        if self.args.should_save:
            save_eval_results(result, args.output_dir)
        low, high = result["success_ci"]
        return {
            f"eval/{split}/success_rate": result["success_rate"],
            f"eval/{split}/success_ci_low": low,
            f"eval/{split}/success_ci_high": high,
            f"eval/{split}/mean_turns": result["mean_turns"],
            f"eval/{split}/episodes": float(result["num_episodes"]),
            f"eval/{split}/env_error_episodes": float(result["env_error_episodes"]),
            f"eval/{split}/weight_syncs": float(generator.weight_syncs),
        }


def env_rollout_of(env_factory, rollout_config, rollout_func) -> MultiTurnRollout | None:
    """The built-in multi-turn rollout of the trainer's arguments, or None (single-turn / a custom rollout_func)."""
    if isinstance(rollout_func, MultiTurnRollout):
        if env_factory is not None or rollout_config is not None:
            raise ValueError("Pass either `rollout_func=MultiTurnRollout(...)` or `env_factory=`, not both.")
        return rollout_func
    if env_factory is None:
        if rollout_config is not None:
            raise ValueError("`rollout_config` configures the built-in multi-turn rollout: pass `env_factory` too.")
        return None
    if rollout_func is not None:
        raise ValueError("Pass either `env_factory` (the built-in multi-turn rollout) or `rollout_func`, not both.")
    return MultiTurnRollout(env_factory, rollout_config)


def _gather_object(records: list) -> list:
    from accelerate.utils import gather_object

    return gather_object(records)
