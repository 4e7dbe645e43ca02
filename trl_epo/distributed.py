"""Distributed setup checks: fail fast when processes would silently train alone."""

from __future__ import annotations


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
