"""Distributed setup: fail fast when processes would silently train alone; build models whole under ZeRO-3."""

from __future__ import annotations

import contextlib


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


@contextlib.contextmanager
def whole_model_init(args):
    """Create models whole (not partitioned) while DeepSpeed ZeRO-3 is configured in `args`.

    Under ZeRO-3, transformers partitions every model it creates with `deepspeed.zero.Init`, a collective that all
    processes must join. A model built by one process alone (a tiny base model), or one whose weights are copied in
    after creation (a critic initialised from the policy), must be created whole: the ZeRO-3 config is hidden from
    transformers meanwhile and restored afterwards; DeepSpeed partitions the model when it is prepared."""
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    config = getattr(getattr(args, "deepspeed_plugin", None), "dschf", None)  # behind transformers' ZeRO-3 switch
    if config is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(config)
