"""EPOTrainer: TRL's GRPOTrainer plus the EPO entropy terms, computed from the loss's own forward pass."""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.trainer.utils import pad

from .config import EPOConfig
from .objective import (
    EntropyReference,
    StepEntropy,
    epo_regularizer,
    phase_weight,
    token_weights,
    trajectory_weights,
)


EPO_STATE_NAME = "epo_state.json"
EPO_RUN_NAME = "epo_run.json"
TURN_IDS_KEY = "turn_ids"
"""Per-token turn index of each completion, as a list per rollout (returned by a `rollout_func` next to `env_mask`).

The trainer pads it to the completion width with -1 and passes it to the loss as ``inputs["turn_ids"]``. Values on
environment/template tokens are ignored (the env mask removes them); without it every completion is one turn.
"""


class EPOTrainer(GRPOTrainer):
    """GRPO with Entropy-regularized Policy Optimization (Xu et al., 2025, arXiv 2509.22576).

    The loss is TRL's GRPO loss for the configured `loss_type`, unchanged, plus

        -lambda * L_H + lambda * beta_k * L_smooth                                             (Eq. 6)

    where `L_H` is the trajectory-level entropy of the action tokens (Eq. 2), `L_smooth` the differentiable corridor
    penalty around the historical entropy reference (Eqs. 3-4) and `beta_k` the phase weight (Eq. 5). The per-token
    entropies (with gradient) are the ones TRL's fused LM head already computes in the policy forward of the loss:
    EPO adds no forward pass.

    Multi-turn data: a `rollout_func` may return `env_mask` (1 on model tokens; TRL uses it as the loss mask) and
    `turn_ids` (per-token turn index, see `TURN_IDS_KEY`); both reach the loss. Without `turn_ids` each completion is
    one turn, so single-turn datasets work unchanged.

    The entropy reference is updated exactly once per optimizer step with that step's mean action-token entropy,
    reduced over all processes and gradient-accumulation micro-batches, so it is identical on every rank. It is saved
    as `epo_state.json` in every checkpoint and restored by `resume_from_checkpoint`.

    Environments: pass `env_factory` (a zero-argument callable returning a `trl_epo.envs.TextEnv`, picklable for the
    default process pool, e.g. `functools.partial(ScienceWorldEnv, simplification="easy")`) and a dataset of tasks
    (rows with the `TaskSpec` columns, e.g. `trl_epo.envs.toy.make_dataset()`). The trainer then plays multi-turn
    episodes with `MultiTurnRollout` (configured by EPOConfig's `env_*` fields) and, unless `reward_funcs` is given,
    rewards each episode with the rollout's env reward. (TRL's own `environment_factory` is a different, tool-calling
    API and is left untouched.)

    Args: those of [`~trl.GRPOTrainer`] (`args` must be an [`EPOConfig`]) plus `env_factory` and, optionally,
    `rollout_config` (a `trl_epo.rollout.RolloutConfig`, e.g. with an env-specific `PromptStyle`; default: built from
    the `env_*` fields of `args`).
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
        self, model, reward_funcs=None, args: EPOConfig | None = None, *pos, env_factory=None, rollout_config=None,
        **kwargs,
    ):
        if rollout_config is not None and env_factory is None:
            raise ValueError("`rollout_config` configures the built-in multi-turn rollout: pass `env_factory` too.")
        if env_factory is not None:
            from .rollout import MultiTurnRollout, env_reward

            if kwargs.get("rollout_func") is not None:
                raise ValueError("Pass either `env_factory` (the built-in multi-turn rollout) or `rollout_func`, not both.")
            kwargs["rollout_func"] = MultiTurnRollout(env_factory, rollout_config)
            if reward_funcs is None:
                reward_funcs = [env_reward]
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = EPOConfig(output_dir=f"{str(name).split('/')[-1]}-EPO")
        if not isinstance(args, EPOConfig):
            raise TypeError(
                f"EPOTrainer needs an EPOConfig, got {type(args).__name__}. Build one with the same arguments: "
                "`EPOConfig(**your_grpo_config.to_dict())` plus the `epo_*` settings."
            )
        with warnings.catch_warnings():
            if env_factory is not None:  # our own use of TRL's (experimental) rollout_func hook
                warnings.filterwarnings("ignore", message=".*rollout_func.*experimental.*")
            super().__init__(model, reward_funcs, args, *pos, **kwargs)
        self.epo_reference = EntropyReference(
            args.epo_reference, ema_decay=args.epo_reference_ema_decay, window=args.epo_reference_window
        )
        self._epo_capture = False
        self._epo_entropies: torch.Tensor | None = None
        self._epo_window: dict[str, torch.Tensor] | None = None  # local sums of the current accumulation window
        self.rollout_rows: list[dict[str, Any]] | None = None  # the dataset rows a rollout_func is generating for
        self.packed_block_marker: list[int] | None = None  # set by windowed rollouts (see _packed_logps_and_entropies)

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
        """The EPO settings of this run and its entropy reference (written as `epo_run.json` after training)."""
        settings = {k: v for k, v in self.args.to_dict().items() if k.startswith(("epo_", "env_"))}
        return {
            "epo": settings,
            "reference": self.epo_reference.state_dict(),
            "final_reference": self.epo_reference.value(),
            "global_step": self.state.global_step,
            "max_steps": self.state.max_steps,
        }

    def close_envs(self) -> None:
        """Stop the environment workers of the multi-turn rollout (they restart on the next rollout)."""
        close = getattr(self.rollout_func, "close", None)
        if callable(close):
            close()

    # ----------------------------------------------------------------------------------------------------------------
    # Data: carry the rollout's per-token turn ids into the loss inputs
    # ----------------------------------------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self.rollout_rows = inputs  # a rollout_func receives only the prompts; it reads the task rows here
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.rollout_rows = None
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
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal,
    ):
        if self.packed_block_marker is not None and all(v is None for v in multimodal.values()):
            result = self._packed_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss
            )
        else:
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal,
            )
        logps, entropies, aux_loss = result
        if self._epo_capture and entropies is not None:
            self._epo_entropies = entropies  # the loss forward's entropies, with their graph
        return logps, entropies, aux_loss

    def _packed_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss
    ):
        """TRL's chunked forward for rows that pack several windowed prompts (see `RolloutConfig.history_turns`):
        positions restart at every block marker and, with no 2D attention mask, transformers keeps the packed
        blocks apart (each block attends only to itself), so every answer is scored on exactly the context it was
        generated from."""
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies, all_aux = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            position_ids = block_position_ids(ids, mask, self.packed_block_marker)
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-logits_to_keep] = -100
            extra = {"output_router_logits": True} if compute_aux_loss else {}
            with self.accelerator.autocast():
                outputs = model(
                    input_ids=ids, position_ids=position_ids, labels=labels, fused_lm_head=True, use_cache=False,
                    **extra,
                )
            all_logps.append(outputs.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                all_entropies.append(outputs.entropy[:, -logits_to_keep:])
            if compute_aux_loss:
                all_aux.append(outputs.aux_loss)
        logps = torch.cat(all_logps, dim=0)
        entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
        aux_loss = torch.stack(all_aux).mean() if compute_aux_loss else None
        return logps, entropies, aux_loss

    # ----------------------------------------------------------------------------------------------------------------
    # Loss
    # ----------------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        self._epo_capture, self._epo_entropies = True, None
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._epo_capture = False
        entropies, self._epo_entropies = self._epo_entropies, None
        if entropies is None:  # pragma: no cover - TRL always computes entropies in the loss forward
            raise RuntimeError("EPOTrainer could not read the loss forward's entropies; check the TRL version (>=1.16).")

        args: EPOConfig = self.args
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # env_mask from a rollout_func: 1 on model tokens only
            mask = mask * inputs["tool_mask"]
        turn_ids = inputs.get(TURN_IDS_KEY)
        if turn_ids is None:
            turn_ids = torch.zeros_like(mask, dtype=torch.long)

        if args.epo_entropy_aggregation == "trajectory":
            weights = trajectory_weights(mask, turn_ids)
        else:
            weights = token_weights(mask)
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
        if args.epo_enabled:
            # Same gradient-accumulation scaling as TRL's loss and entropy bonus (loss_is_scaled_for_ga).
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + terms.regularizer / normalizer

        # Metrics, reduced across processes.
        stats = torch.stack([terms.entropy, terms.smooth_penalty]).float()
        stats = self.accelerator.gather(stats.unsqueeze(0)).mean(0)
        self._metrics[mode]["epo/entropy"].append(stats[0].item())
        self._metrics[mode]["epo/smooth_penalty"].append(stats[1].item())
        self._metrics[mode]["epo/beta"].append(beta)
        if reference is not None:
            outside = (terms.out_of_corridor_frac * mask.sum()).detach().float()
            counts = self.accelerator.reduce(torch.stack([outside, mask.sum().float()]), reduction="sum")
            self._metrics[mode]["epo/out_of_corridor_frac"].append((counts[0] / counts[1].clamp(min=1)).item())
            self._metrics[mode]["epo/reference"].append(float(self.epo_reference.value()))

        if mode == "train":
            self._epo_accumulate(entropies.detach(), mask, turn_ids)
            if self.accelerator.sync_gradients:
                self._epo_end_of_step()
        return loss

    # ----------------------------------------------------------------------------------------------------------------
    # The entropy reference: one update per optimizer step, from globally reduced statistics
    # ----------------------------------------------------------------------------------------------------------------

    def _epo_accumulate(self, entropies: torch.Tensor, mask: torch.Tensor, turn_ids: torch.Tensor) -> None:
        mask = mask.float()
        slots = int(turn_ids.max().clamp(min=0).item()) + 1
        index = turn_ids.clamp(min=0).flatten()
        turn_sum = torch.zeros(slots, device=mask.device).scatter_add_(0, index, (entropies.float() * mask).flatten())
        turn_count = torch.zeros(slots, device=mask.device).scatter_add_(0, index, mask.flatten())
        window = self._epo_window
        if window is None:
            self._epo_window = {"turn_sum": turn_sum, "turn_count": turn_count}
            return
        size = max(slots, window["turn_sum"].numel())
        for key, value in (("turn_sum", turn_sum), ("turn_count", turn_count)):
            grown = torch.zeros(size, device=mask.device)
            grown[: window[key].numel()] += window[key]
            grown[:slots] += value
            window[key] = grown

    def _epo_end_of_step(self) -> None:
        window, self._epo_window = self._epo_window, None
        device = self.accelerator.device
        local = torch.tensor([0 if window is None else window["turn_sum"].numel()], device=device)
        slots = int(self.accelerator.gather(local).max().item())
        if slots == 0:
            return
        buffer = torch.zeros(2, slots, device=device)
        if window is not None:
            buffer[0, : window["turn_sum"].numel()] = window["turn_sum"]
            buffer[1, : window["turn_count"].numel()] = window["turn_count"]
        buffer = self.accelerator.reduce(buffer, reduction="sum")
        total = buffer[1].sum().item()
        mean = buffer[0].sum().item() / total if total > 0 else math.nan
        turn_means = {t: (buffer[0, t] / buffer[1, t]).item() for t in range(slots) if buffer[1, t] > 0}
        self.epo_reference.update(StepEntropy(mean=mean, turn_means=turn_means))
        self._metrics["train"]["epo/step_entropy"].append(mean)
        if len(turn_means) > 1 or (turn_means and self.args.epo_reference == "per_turn"):
            for t, value in turn_means.items():
                self._metrics["train"][f"epo/entropy_turn/{t}"].append(value)

    # ----------------------------------------------------------------------------------------------------------------
    # Checkpointing
    # ----------------------------------------------------------------------------------------------------------------

    def _epo_state(self) -> dict:
        return {"reference": self.epo_reference.state_dict(), "global_step": self.state.global_step}

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            output_dir = os.path.join(self._get_output_dir(trial=trial), folder)
            write_json_atomic(os.path.join(output_dir, EPO_STATE_NAME), self._epo_state())

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, EPO_STATE_NAME)
        if os.path.exists(path):
            with open(path) as f:
                self.epo_reference.load_state_dict(json.load(f)["reference"])
        elif self.args.epo_enabled:
            raise FileNotFoundError(
                f"{path} is missing, so the EPO entropy reference cannot be restored. Resume from a checkpoint written "
                "by EPOTrainer, or start a new run."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Distributed setup check
    # ----------------------------------------------------------------------------------------------------------------

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        check_process_group(self.accelerator)

    def end(self):
        """Finish the trackers and destroy the process group (call it last, as `Trainer.end`). The distributed model
        wrapper (DDP / DeepSpeed engine) is released first, while its process group still exists: destroyed after the
        group (when the trainer is garbage-collected at exit), a DDP model over gloo can hang the process."""
        import gc

        self.model_wrapped = self.model
        self.accelerator.free_memory()
        gc.collect()
        parent_end = getattr(super(), "end", None)  # Trainer.end exists from transformers 5.18
        return parent_end() if parent_end is not None else self.accelerator.end_training()

    # ----------------------------------------------------------------------------------------------------------------
    # Hub: model card and saving (the logic lives in trl_epo.hub)
    # ----------------------------------------------------------------------------------------------------------------

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        eval_results=None,
        output_dir: str | None = None,
        contents: str | None = None,
    ):
        """TRL's model card (README.md in `args.output_dir`) plus an "EPO training" section: environment and split,
        `epo_*`/`env_*` settings, adapter, final entropy reference and, when present, the evaluation table and
        `model-index` (from `eval_results`, or `<output_dir>/eval_results.json` written by
        `trl_epo.hub.save_eval_results`). With `output_dir`, the card is (also) written there, noting `contents`."""
        if model_name is None:  # as TRL names it at checkpoints and in push_to_hub
            hub_id = self.args.hub_model_id
            model_name = hub_id.split("/")[-1] if hub_id else os.path.basename(os.path.abspath(self.args.output_dir))
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        from huggingface_hub import ModelCard

        from . import hub

        readme = os.path.join(self.args.output_dir, "README.md")
        trl_card = ModelCard.load(readme)
        if eval_results is None:
            results = hub.load_eval_results(self.args.output_dir)
        elif isinstance(eval_results, str):
            results = hub.load_eval_results(eval_results)
        else:
            results = [r if isinstance(r, hub.EvalResult) else hub.EvalResult.from_dict(r) for r in eval_results]
        summary = hub.training_summary(self)
        hub.add_epo_section(trl_card, summary, results, tags=self._tag_names).save(readme)
        if output_dir is not None and os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
            os.makedirs(output_dir, exist_ok=True)
            card = ModelCard.load(readme)
            hub.add_epo_section(card, summary, results, contents=contents, tags=self._tag_names)
            card.save(os.path.join(output_dir, "README.md"))

    def save_adapter(self, output_dir: str | None = None) -> str:
        """Save the PEFT adapter alone (+ tokenizer and model card). Call it on every process."""
        from .hub import save_adapter

        return save_adapter(self, output_dir)

    def save_merged_model(self, output_dir: str, safe_serialization: bool = True) -> str:
        """Save the base model with the adapter merged in (+ tokenizer and card); refuses a 4-bit/8-bit base.
        Call it on every process."""
        from .hub import save_merged_model

        return save_merged_model(self, output_dir, safe_serialization=safe_serialization)


def check_process_group(accelerator) -> None:
    """Fail fast when the processes would not train together.

    Two broken setups look like a normal run but train each process alone (no gradient synchronisation, no reduction
    of the EPO statistics, so each process ends with its own entropy reference). Both happen on machines without GPUs:
    DeepSpeed without a named backend (torch.distributed has N processes, accelerate sees one), and a multi-GPU
    config with a named backend but without `use_cpu` (accelerate sees N processes but no distributed mode).
    """
    import torch.distributed as dist
    from accelerate.utils import DistributedType

    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    if world != accelerator.num_processes:
        raise RuntimeError(
            f"torch.distributed runs {world} processes but accelerate sees {accelerator.num_processes}: each process "
            "would train alone and the EPO entropy reference would differ between processes. Without GPUs (e.g. "
            "DeepSpeed on CPU) set the backend explicitly: `--ddp_backend gloo` (TrainingArguments.ddp_backend)."
        )
    if world > 1 and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(
            f"{world} processes are running but accelerate found no distributed mode (no GPU for the multi-GPU "
            "config): gradients and EPO statistics would not be synchronised. Without GPUs train data-parallel on the "
            "CPU with `--use_cpu` (gloo), or use a DeepSpeed config with `--ddp_backend gloo`."
        )

def block_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, marker: list[int]) -> torch.Tensor:
    """Position ids that restart at 0 at the first real token of each row and at every occurrence of `marker` (the
    header every packed block starts with). Left padding forms its own block; positions after the last real token
    simply continue (causal attention keeps them from affecting real tokens)."""
    batch, length = input_ids.shape
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    first_real = attention_mask.long().argmax(dim=1)
    starts[torch.arange(batch, device=input_ids.device), first_real] = True
    m = len(marker)
    if 0 < m <= length:
        pattern = torch.as_tensor(marker, device=input_ids.device, dtype=input_ids.dtype)
        hits = (input_ids.unfold(1, m, 1) == pattern).all(-1) & attention_mask[:, : length - m + 1].bool()
        starts[:, : length - m + 1] |= hits
    index = torch.arange(length, device=input_ids.device).expand(batch, -1)
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - last_start


def write_json_atomic(path: str, payload: dict) -> None:
    """Write JSON so that a crash never leaves a half-written file (temp file + atomic rename)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
