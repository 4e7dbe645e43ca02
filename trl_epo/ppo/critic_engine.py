"""The critic as the row training drives it: prepared by the trainer's accelerator after the policy, then forward,
backward, optimizer step and checkpoint through the same calls in one process, under DDP and under DeepSpeed.

Why a separate critic (and not one module holding policy and critic, as TRL's experimental PPOTrainer does): TRL's
GRPOTrainer, which EPOTrainer extends, needs `self.model` to be the causal LM (generation, the fused LM-head loss
forward, PEFT and vLLM weight syncs, saving, the reference model), and the reference clips and steps the critic's
gradients apart from the policy's.

* DDP: accelerate wraps the critic like the policy (`Accelerator.prepare_model`); gradients are reduced on the last
  chunk of an optimizer step (earlier chunks run under `no_sync`), clipped to `max_grad_norm`, then the critic's own
  optimizer and LR schedule step.
* DeepSpeed: accelerate refuses two models in one `prepare` call under DeepSpeed but builds one engine per call, with
  the same DeepSpeed config (ZeRO stage, gradient clipping); `Accelerator.backward` keeps driving the first engine
  prepared (the policy's, prepared before the critic), so the critic's engine is driven directly:
  `set_gradient_accumulation_boundary`, `backward(scale_wrt_gas=False)`, `step`. Its LR schedule steps the torch
  optimizer whose parameter groups the ZeRO optimizer steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle

import torch
from accelerate.utils import DistributedType

from ..run_files import write_json_atomic
from .critic import load_critic_weights


logger = logging.getLogger(__name__)

CRITIC_DIR = "critic"
"""The critic (save_pretrained format: full weights, or a LoRA critic's adapter and head) in an output directory or
a checkpoint, with its optimizer and LR schedule states in a checkpoint."""
ENGINE_TAG = "critic_engine"
"""DeepSpeed: the critic engine's checkpoint tag (a folder of the checkpoint; the policy's engine keeps `latest`)."""
OPTIMIZER_NAME, SCHEDULER_NAME = "optimizer.pt", "scheduler.json"
"""The optimizer state is tensors (read with `torch.load(weights_only=True)`), the LR schedule's state JSON: loading
a critic's state never unpickles arbitrary objects."""


class CriticEngine:
    """The critic (`model`, unwrapped; `wrapped`, what accelerate made of it), its optimizer and LR schedule."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.wrapped = model
        self.optimizer: torch.optim.Optimizer | None = None  # the torch optimizer (DeepSpeed: the one ZeRO steps)
        self.scheduler = None
        self.accelerator = None

    @property
    def prepared(self) -> bool:
        return self.accelerator is not None

    @property
    def deepspeed(self) -> bool:
        return self.prepared and self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def prepare(self, accelerator, make_optimizer, make_scheduler) -> None:
        """Wrap the critic like the policy and build its optimizer (`make_optimizer(model)`) and LR schedule
        (`make_scheduler(optimizer)`). Call it after the policy was prepared."""
        self.accelerator = accelerator
        if self.deepspeed:
            optimizer = make_optimizer(self.model)
            self.wrapped, _ = accelerator.prepare(self.model, optimizer)
        else:
            self.wrapped = accelerator.prepare_model(self.model)
            optimizer = make_optimizer(self.model)
        self.optimizer = optimizer
        self.scheduler = make_scheduler(optimizer)
        self.wrapped.train()

    # ---- one chunk: forward under `accumulate`, then `backward`; `step` after the last chunk of a step
    @contextlib.contextmanager
    def accumulate(self, sync: bool):
        """The context of a chunk's forward and backward: DDP reduces gradients only when `sync` (the last chunk of
        the optimizer step)."""
        distributed = self.prepared and self.accelerator.num_processes > 1
        if sync or self.deepspeed or not distributed:
            yield
            return
        with self.accelerator.no_sync(self.wrapped):
            yield

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        if self.deepspeed:
            self.wrapped.set_gradient_accumulation_boundary(sync)
            self.wrapped.backward(loss, scale_wrt_gas=False)  # the losses are normalised per optimizer step already
        else:
            loss.backward()

    def step(self, max_grad_norm: float) -> float | None:
        """Clip, step the optimizer and the LR schedule, clear the gradients. Returns the gradient norm."""
        if self.deepspeed:
            self.wrapped.step()  # DeepSpeed clips to its `gradient_clipping` (max_grad_norm) and zeroes the gradients
            norm = self.wrapped.get_global_grad_norm()
        else:
            norm = None
            if max_grad_norm and max_grad_norm > 0:
                params = [p for p in self.model.parameters() if p.requires_grad]
                norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(norm) if norm is not None else None

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ---- saving and resuming
    def save_pretrained(self, folder: str, should_save: bool) -> None:
        """The critic in `save_pretrained` format (ZeRO-3: gathered; call it on every process). Under ZeRO-3 without
        `stage3_gather_16bit_weights_on_model_save` nothing is written (checkpoints still hold the engine's state)."""
        if not self.prepared:
            state = self.model.state_dict()
        else:
            try:
                state = self.accelerator.get_state_dict(self.wrapped)
            except ValueError as error:  # ZeRO-3 without 16-bit gathering on save
                logger.warning("The critic is not saved in save_pretrained format: %s", error)
                return
        if should_save:
            self.model.save_pretrained(folder, state_dict=state)

    def save_state(self, checkpoint: str, should_save: bool) -> None:
        """The critic's optimizer and LR schedule states (DeepSpeed: the engine's checkpoint, weights included) into
        `checkpoint`, next to the weights `save_pretrained` wrote there. Call it on every process."""
        folder = os.path.join(checkpoint, CRITIC_DIR)
        if self.deepspeed:
            self.wrapped.save_checkpoint(checkpoint, tag=ENGINE_TAG, save_latest=False)
        if should_save:
            os.makedirs(folder, exist_ok=True)
            if not self.deepspeed:
                torch.save(self.optimizer.state_dict(), os.path.join(folder, OPTIMIZER_NAME))
            write_json_atomic(os.path.join(folder, SCHEDULER_NAME), scheduler_state(self.scheduler))

    def load_state(self, checkpoint: str) -> None:
        """Restore the critic's weights, optimizer and LR schedule saved by `save_pretrained` + `save_state`."""
        folder = os.path.join(checkpoint, CRITIC_DIR)
        if not os.path.exists(os.path.join(folder, SCHEDULER_NAME)):
            raise FileNotFoundError(
                f"{folder} holds no critic state, so the critic and its optimizer cannot be restored. Resume from a "
                "checkpoint written by EPOPPOTrainer, or start a new run."
            )
        if self.deepspeed:
            peft = hasattr(self.model, "peft_config")
            path, _ = self.wrapped.load_checkpoint(
                checkpoint, tag=ENGINE_TAG, load_module_strict=not peft, load_lr_scheduler_states=False
            )
            if path is None:
                raise FileNotFoundError(f"No DeepSpeed critic checkpoint ({ENGINE_TAG}) in {checkpoint}.")
        else:
            load_critic_weights(self.model, folder)
            device = next(self.model.parameters()).device
            path = os.path.join(folder, OPTIMIZER_NAME)
            with _refused_unless_plain(path):
                state = torch.load(path, map_location=device, weights_only=True)
            self.optimizer.load_state_dict(state)
        path = os.path.join(folder, SCHEDULER_NAME)
        with _refused_unless_plain(path), open(path, encoding="utf-8") as f:
            state = json.load(f)
        self.scheduler.load_state_dict(state)


@contextlib.contextmanager
def _refused_unless_plain(path: str):
    """A state file that is not plain tensors / JSON (e.g. a pickle with code in it) is refused, never run."""
    try:
        yield
    except (ValueError, UnicodeDecodeError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"{path} is not a critic state written by trl_epo ({type(error).__name__}: {str(error)[:200]}); it is not "
            "loaded (checkpoints are never unpickled). Resume from an intact checkpoint."
        ) from error


def scheduler_state(scheduler) -> dict:
    """An LR schedule's state as JSON values. Its LR functions (`lr_lambdas`: code, rebuilt from the config on resume)
    are left out, as `LambdaLR` does for plain functions."""
    state = dict(scheduler.state_dict())
    if "lr_lambdas" in state:
        state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
    for key, value in state.items():
        try:
            json.dumps(value)
        except TypeError as error:
            raise TypeError(
                f"The critic's LR schedule ({type(scheduler).__name__}) has a state entry {key!r} that is not JSON "
                f"({error}); pick one of transformers' schedules."
            ) from error
    return state
