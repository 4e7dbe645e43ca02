"""EPOTrainer: TRL's GRPOTrainer plus the EPO entropy terms (from the loss's own forward pass) and multi-turn
environment rollouts."""

from __future__ import annotations

import gc
import json
import os
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.trainer.utils import pad

from .config import EPOConfig
from .distributed import check_process_group
from .env_training import EnvTrainingMixin, env_rollout_of
from .objective import EntropyReference, EntropyWindow, aggregation_weights, epo_regularizer, phase_weight
from .packing import row_logps_and_entropies
from .results import EvalResult, load_eval_results
from .rollout import RolloutConfig
from .rollout import env_reward as env_reward_func
from .row_options import applied_entropy_coef, check_row_options, row_loss
from .row_training import RowTrainingMixin
from .run_files import EPO_RUN_NAME, EPO_STATE_NAME, write_json_atomic


TURN_IDS_KEY = "turn_ids"
"""Per-token turn index of each completion, as a list per rollout (returned by a `rollout_func` next to `env_mask`);
padded with -1 and passed to the loss as ``inputs["turn_ids"]``. Without it every completion is one turn."""


class EPOTrainer(RowTrainingMixin, EnvTrainingMixin, GRPOTrainer):
    """GRPO with Entropy-regularized Policy Optimization (Xu et al., 2025, arXiv 2509.22576).

    The loss is TRL's GRPO loss for the configured `loss_type`, unchanged, plus ``-lambda * L_H + lambda * beta_k *
    L_smooth`` (Eq. 6; `trl_epo.objective`), computed from the per-token entropies TRL's fused LM head already
    computes in the loss's forward pass: EPO adds no forward pass. The entropy reference is updated once per optimizer
    step with that step's mean action-token entropy, reduced over all processes and micro-batches, and saved as
    `epo_state.json` in every checkpoint.

    Environments: pass `env_factory` (a zero-argument callable returning a `trl_epo.envs.TextEnv`, picklable for the
    default process pool) and a dataset of tasks (rows with the `TaskSpec` columns, e.g.
    `trl_epo.envs.toy.make_dataset()`); optionally `rollout_config` (default: built from the `env_*` fields of `args`
    and the env's registry defaults) or `rollout_func=MultiTurnRollout(...)`. Episodes are rewarded with the env's
    outcome unless `reward_funcs` is given. `eval_dataset` (a task dataset, or a dict split -> dataset) is played at
    `env_eval_temperature` every `eval_steps` (`eval_strategy="steps"`), logged as `eval/<split>/success_rate`.

    With an environment, a rollout's episodes become training rows (`env_sample_layout`: one row per turn, packed, or
    one per full-context episode; `trl_epo.rows`), with each episode's advantage on all its rows, consumed in
    `env_updates_per_rollout` optimizer steps, every row once, in forward chunks under `env_forward_token_budget`
    (`trl_epo.row_training`). The environment side lives in `trl_epo.env_training`.

    TRL hooks overridden, and why:
        `_get_train_sampler` (env rows): TRL's task sampler with each epoch's shuffle drawn from (seed, epoch), so a
            resumed run plays the same tasks (`trl_epo.sampling`).
        `_prepare_inputs` / `training_step` (env rows): a rollout's rows, scheduled into its optimizer steps, trained
            in token-budgeted chunks with the step's global normalisers (TRL's batch is one padded row per prompt).
        `_generate_and_score_completions`: carries the per-token turn ids a custom `rollout_func` returns into the
            loss.
        `_get_per_token_logps_and_entropies`: scores packed windowed rows block by block, and keeps the loss
            forward's entropies (with their graph) for the EPO terms.
        `_compute_loss`: adds the EPO terms to TRL's loss and accumulates the step's entropy statistics.
        `evaluate`: plays the eval task splits with the policy (environment success, not a loss).
        `create_scheduler`: optionally steps the LR schedule once per rollout (`env_lr_per_rollout`).
        `_save_checkpoint` / `_load_optimizer_and_scheduler`: save and restore the entropy reference, and the rest of
            a rollout when a checkpoint falls inside its K updates.
        `create_accelerator_and_postprocess`: fails fast on process groups that would train each process alone.
        `create_model_card`: adds the "EPO training" section (settings, reference, evaluation table).
        `train` / `end`: close the env workers and write `epo_run.json`; release the distributed model first.
    """

    _tag_names = ["trl", "grpo", "epo", "reinforcement-learning"]
    _name = "EPO"
    _paper = {
        "title": "EPO: Entropy-regularized Policy Optimization for LLM Agents Reinforcement Learning",
        "id": "2509.22576",
        "citation": (
            "@article{xu2025epo,\n"
            "    title        = {{EPO: Entropy-regularized Policy Optimization for LLM Agents Reinforcement Learning}},\n"
            "    author       = {Wujiang Xu and others},\n"
            "    year         = 2025,\n"
            "    eprint       = {arXiv:2509.22576}\n"
            "}"
        ),
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: EPOConfig | None = None,
        *pos,
        env_factory=None,
        rollout_config: RolloutConfig | None = None,
        **kwargs,
    ):
        self.env_rollout = env_rollout_of(env_factory, rollout_config, kwargs.get("rollout_func"))
        if self.env_rollout is not None:  # the env rollout is played by the row training, not TRL's generation
            kwargs.pop("rollout_func", None)
            reward_funcs = reward_funcs if reward_funcs is not None else [env_reward_func]
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = EPOConfig(output_dir=f"{str(name).split('/')[-1]}-EPO")
        if not isinstance(args, EPOConfig):
            raise TypeError(
                f"EPOTrainer needs an EPOConfig, got {type(args).__name__}. Build one with the same arguments: "
                "`EPOConfig(**your_grpo_config.to_dict())` plus the `epo_*` settings."
            )
        super().__init__(model, reward_funcs, args, *pos, **kwargs)
        if self.env_rollout is not None:
            check_row_options(self)  # TRL options env rows cannot apply per optimizer step are refused here
        self.epo_reference = EntropyReference(
            args.epo_reference, ema_decay=args.epo_reference_ema_decay, window=args.epo_reference_window
        )
        self._entropy_window = EntropyWindow()
        self._epo_capture, self._epo_entropies = False, None
        self._epo_step_sums: torch.Tensor | None = None  # env rows: the step's EPO terms, summed over chunks

    # ---- TRL hooks: data
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        # TRL merges a rollout_func's extra fields into the input rows (for reward functions); pick up the turn ids.
        if inputs and TURN_IDS_KEY in inputs[0]:
            width = output["completion_ids"].size(1)
            rows = []
            for row in inputs:
                ids = torch.as_tensor(row[TURN_IDS_KEY], dtype=torch.long)[:width]
                rows.append(torch.cat([ids, ids.new_full((width - ids.numel(),), -1)]))
            output[TURN_IDS_KEY] = pad(rows, padding_value=-1).to(output["completion_ids"].device)
        return output

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        if self._row_mode and all(v is None for v in multimodal.values()):
            result = row_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                compute_entropy,
                compute_aux_loss,
                self._packed_block_marker,
                self.accelerator.autocast,
            )
        else:
            result = super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **multimodal,
            )
        if self._epo_capture and result[1] is not None:
            self._epo_entropies = result[1]  # the loss forward's entropies, with their graph
        return result

    # ---- TRL hooks: loss
    def _compute_loss(self, model, inputs):
        self._epo_capture, self._epo_entropies = True, None
        trl_entropy_coef = applied_entropy_coef(self)  # before TRL's adaptive controller updates it
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._epo_capture = False
        entropies, self._epo_entropies = self._epo_entropies, None
        if entropies is None:  # pragma: no cover - TRL always computes entropies in the loss forward
            raise RuntimeError("EPOTrainer could not read the loss forward's entropies; check the TRL version.")

        args: EPOConfig = self.args
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # env_mask from a rollout_func: 1 on model tokens only
            mask = mask * inputs["tool_mask"]
        turn_ids = inputs.get(TURN_IDS_KEY)
        if turn_ids is None:
            turn_ids = torch.zeros_like(mask, dtype=torch.long)
        row_scale = inputs.get("row_loss_scale")  # env rows: the chunk's share of its optimizer step
        if row_scale is not None:  # TRL's entropy bonus becomes the step's token mean (`trl_epo.row_options`)
            loss = row_loss(
                loss,
                row_scale,
                trl_entropy_coef,
                entropies,
                mask,
                inputs["row_step_action_tokens"],
                self.current_gradient_accumulation_steps,
                self.accelerator.num_processes,
            )
            weights = inputs["epo_weights"].to(entropies.dtype) * mask  # the step's global Eq. 2 weights
        else:
            weights = aggregation_weights(args.epo_entropy_aggregation, mask, turn_ids)
        total_steps = max(1, self.state.max_steps)
        step = min(self.state.global_step, total_steps)
        beta = phase_weight(step, total_steps, args.epo_phase_gamma, args.epo_phase_schedule)
        reference = self.epo_reference.per_token(turn_ids, dtype=entropies.dtype)
        terms = epo_regularizer(
            entropies,
            weights,
            mask,
            entropy_coef=args.epo_entropy_coef,
            beta=beta,
            reference=reference,
            alpha=args.epo_smoothing_alpha,
            kappa_low=args.epo_kappa_low,
            kappa_high=args.epo_kappa_high,
            smoothing=args.epo_smoothing,
        )
        if args.epo_enabled and row_scale is not None:
            # Global weights: summed over chunks and processes they give L_H; data parallelism averages gradients.
            loss = loss + terms.regularizer * self.accelerator.num_processes
        elif args.epo_enabled:
            # Same gradient-accumulation scaling as TRL's loss and entropy bonus (loss_is_scaled_for_ga).
            loss = loss + terms.regularizer / (self.current_gradient_accumulation_steps if mode == "train" else 1.0)
        if row_scale is None:
            self._log_epo_terms(mode, terms, beta, reference, mask)
        else:  # partial sums of the step: logged once the step is complete
            outside = (terms.out_of_corridor_frac * mask.sum()).detach().float()
            sums = torch.stack([terms.entropy.float(), terms.smooth_penalty.float(), outside, mask.sum().float()])
            self._epo_step_sums = sums if self._epo_step_sums is None else self._epo_step_sums + sums
        if mode == "train":
            self._entropy_window.add(entropies, mask, turn_ids)
            if self.accelerator.sync_gradients:
                if row_scale is not None:
                    self._log_epo_step_sums(beta, reference is not None)
                self._end_of_optimizer_step()
        return loss

    def _log_epo_terms(self, mode, terms, beta, reference, mask) -> None:
        stats = self.accelerator.gather(torch.stack([terms.entropy, terms.smooth_penalty]).float().unsqueeze(0))
        stats = stats.mean(0)
        self._metrics[mode]["epo/entropy"].append(stats[0].item())
        self._metrics[mode]["epo/smooth_penalty"].append(stats[1].item())
        self._metrics[mode]["epo/beta"].append(beta)
        if reference is not None:
            outside = (terms.out_of_corridor_frac * mask.sum()).detach().float()
            counts = self.accelerator.reduce(torch.stack([outside, mask.sum().float()]), reduction="sum")
            self._metrics[mode]["epo/out_of_corridor_frac"].append((counts[0] / counts[1].clamp(min=1)).item())
            self._metrics[mode]["epo/reference"].append(float(self.epo_reference.value()))

    def _log_epo_step_sums(self, beta: float, has_reference: bool) -> None:
        """Env rows: L_H and L_smooth of the whole optimizer step (sums of the chunks' shares, all processes)."""
        sums, self._epo_step_sums = self._epo_step_sums, None
        sums = self.accelerator.reduce(sums, reduction="sum")
        metrics = self._metrics["train"]
        metrics["epo/entropy"].append(sums[0].item())
        metrics["epo/smooth_penalty"].append(sums[1].item())
        metrics["epo/beta"].append(beta)
        if has_reference:
            metrics["epo/out_of_corridor_frac"].append((sums[2] / sums[3].clamp(min=1)).item())
            metrics["epo/reference"].append(float(self.epo_reference.value()))

    def _end_of_optimizer_step(self) -> None:
        """Append the step's entropy to the reference: once per optimizer step, identical on every process."""
        accelerator = self.accelerator

        def reduce_max(n: int) -> int:
            return int(accelerator.gather(torch.tensor([n], device=accelerator.device)).max().item())

        step = self._entropy_window.close(
            lambda t: accelerator.reduce(t, reduction="sum"), reduce_max, accelerator.device
        )
        if step is None:
            return
        self.epo_reference.update(step)
        self._metrics["train"]["epo/step_entropy"].append(step.mean)
        if len(step.turn_means) > 1 or (step.turn_means and self.args.epo_reference == "per_turn"):
            for t, value in step.turn_means.items():
                self._metrics["train"][f"epo/entropy_turn/{t}"].append(value)

    # ---- training, checkpoints, the run file
    def train(self, *args, **kwargs):
        try:
            output = super().train(*args, **kwargs)
        finally:
            self.close_envs()
        if self.args.should_save:
            self.save_state()  # trainer_state.json (log history) next to the final model, for plots
            write_json_atomic(os.path.join(self.args.output_dir, EPO_RUN_NAME), self.epo_run_summary())
        return output

    def epo_run_summary(self) -> dict:
        """The EPO settings of this run, its resolved rollout settings and its entropy reference (`epo_run.json`)."""
        return {
            "epo": {k: v for k, v in self.args.to_dict().items() if k.startswith(("epo_", "env_"))},
            "rollout": self.rollout_record(),
            "reference": self.epo_reference.state_dict(),
            "final_reference": self.epo_reference.value(),
            "global_step": self.state.global_step,
            "max_steps": self.state.max_steps,
        }

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            state = {"reference": self.epo_reference.state_dict(), "global_step": self.state.global_step}
            write_json_atomic(os.path.join(folder, EPO_STATE_NAME), state)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._save_row_buffer(folder)  # every process: the rest of a rollout when the step falls inside it

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        self._load_row_buffer(checkpoint)
        path = os.path.join(checkpoint, EPO_STATE_NAME)
        if os.path.exists(path):
            with open(path) as f:
                self.epo_reference.load_state_dict(json.load(f)["reference"])
        elif self.args.epo_enabled:
            raise FileNotFoundError(
                f"{path} is missing, so the EPO entropy reference cannot be restored. Resume from a checkpoint written "
                "by EPOTrainer, or start a new run."
            )

    # ---- distributed setup
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        check_process_group(self.accelerator)

    def end(self):
        """Finish the trackers and destroy the process group (call it last, as `Trainer.end`). The distributed model
        wrapper (DDP / DeepSpeed engine) is released first, while its process group still exists: destroyed after the
        group (when the trainer is garbage-collected at exit), a DDP model over gloo can hang the process."""
        self.model_wrapped = self.model
        self.accelerator.free_memory()
        gc.collect()
        parent_end = getattr(super(), "end", None)  # Trainer.end exists from transformers 5.18
        return parent_end() if parent_end is not None else self.accelerator.end_training()

    # ---- the Hub: model card and saving
    def create_model_card(
        self, model_name=None, dataset_name=None, tags=None, eval_results=None, output_dir=None, contents=None
    ):
        """TRL's model card (README.md in `args.output_dir`) plus an "EPO training" section (see `trl_epo.card`), with
        the evaluation table from `eval_results` or `<output_dir>/eval_results.json`. With `output_dir`, the card is
        (also) written there, noting `contents`."""
        from huggingface_hub import ModelCard

        from . import card

        if model_name is None:  # as TRL names it at checkpoints and in push_to_hub
            hub_id = self.args.hub_model_id
            model_name = hub_id.split("/")[-1] if hub_id else os.path.basename(os.path.abspath(self.args.output_dir))
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        readme = os.path.join(self.args.output_dir, "README.md")
        if eval_results is None or isinstance(eval_results, str):
            results = load_eval_results(eval_results or self.args.output_dir)
        else:
            results = [r if isinstance(r, EvalResult) else EvalResult.from_dict(r) for r in eval_results]
        summary = card.training_summary(self)
        card.add_epo_section(ModelCard.load(readme), summary, results, tags=self._tag_names).save(readme)
        if output_dir is not None and os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
            os.makedirs(output_dir, exist_ok=True)
            copy = card.add_epo_section(
                ModelCard.load(readme), summary, results, contents=contents, tags=self._tag_names
            )
            copy.save(os.path.join(output_dir, "README.md"))

    def save_adapter(self, output_dir: str | None = None) -> str:
        """Save the PEFT adapter alone (+ tokenizer and model card). Call it on every process (ZeRO-3 gathers it)."""
        from .saving import ADAPTER_CONTENTS, require_peft

        output_dir = output_dir or self.args.output_dir
        require_peft(self.accelerator.unwrap_model(self.model), "save_adapter")
        self.save_model(output_dir)  # transformers saves only the adapter of a PeftModel (gathered under ZeRO-3)
        if self.args.should_save:
            self.create_model_card(output_dir=output_dir, contents=ADAPTER_CONTENTS)
        self.accelerator.wait_for_everyone()
        return output_dir

    def save_merged_model(self, output_dir: str, safe_serialization: bool = True) -> str:
        """Save the base model with the adapter merged in (+ tokenizer and card), leaving the training model as it
        was; refuses a 4-bit/8-bit base (`trl_epo.saving`). Call it on every process."""
        from .saving import MERGED_CONTENTS, save_merged_model

        model = self.accelerator.unwrap_model(self.model)
        gather = self._dist.gather_params  # ZeRO-3: full weights on every process
        save_merged_model(
            model,
            output_dir,
            gather,
            self.args.should_save,
            self.processing_class,
            safe_serialization=safe_serialization,
        )
        if self.args.should_save:
            self.create_model_card(output_dir=output_dir, contents=MERGED_CONTENTS)
        self.accelerator.wait_for_everyone()
        return output_dir
