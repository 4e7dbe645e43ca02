"""Several "processes" in one test process: one thread per rank, and the collectives TRL's vLLM code and ours use
(accelerate's `gather_object` / `broadcast_object_list`, `torch.distributed.all_gather_object` / `get_rank`, the
accelerator's `reduce` / `gather`) replaced by barrier exchanges between the threads, with their real semantics:
results in rank order, a gather of lists flattened, a broadcast from one rank. A rank that makes a different number
of collective calls than the others breaks the barrier (timeout) instead of hanging the test."""

from __future__ import annotations

import threading

import torch


class ThreadWorld:
    """`size` ranks, one thread each (`run`); `exchange(obj)` is an all-gather of Python objects."""

    def __init__(self, size: int, timeout: float = 60.0):
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._slots = [None] * size
        self._local = threading.local()
        self.calls = [0] * size  # collective calls made by each rank

    @property
    def rank(self) -> int:
        return getattr(self._local, "rank", 0)

    def exchange(self, obj) -> list:
        self.calls[self.rank] += 1
        if self.size == 1:
            return [obj]
        self._slots[self.rank] = obj
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()
        return out

    def run(self, fn) -> list:
        """`fn(rank)` on every rank at once; its results in rank order (the first real error is raised)."""
        results, errors = [None] * self.size, [None] * self.size

        def target(rank):
            self._local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as error:  # noqa: BLE001 - re-raised below, in the test's thread
                errors[rank] = error
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
        if real or any(errors):
            raise (real or [e for e in errors if e is not None])[0]
        return results

    # ---- the collectives, with the signatures of the functions they replace
    def gather_object(self, obj):
        return [x for part in self.exchange(obj) for x in part]

    def broadcast_object_list(self, objects, from_process: int = 0):
        objects[:] = self.exchange(list(objects))[from_process]
        return objects

    def all_gather_object(self, output, obj, group=None):
        parts = self.exchange(obj)
        output[:] = [parts[r] for r in (group if group is not None else range(self.size))]

    def get_rank(self, group=None) -> int:
        return self.rank if group is None else list(group).index(self.rank)

    def patch(self, monkeypatch) -> None:
        """Route the collectives of TRL's vLLM module and ours through this world."""
        import trl.generation.vllm_generation as trl_vllm

        import trl_epo.rollout.vllm as ours

        for module in (trl_vllm, ours):
            monkeypatch.setattr(module, "gather_object", self.gather_object, raising=False)
            monkeypatch.setattr(module, "broadcast_object_list", self.broadcast_object_list, raising=False)
        monkeypatch.setattr(torch.distributed, "all_gather_object", self.all_gather_object)
        monkeypatch.setattr(torch.distributed, "get_rank", self.get_rank)


class FakeAccelerator:
    """The part of `accelerate.Accelerator` the rollout uses, on one rank of a `ThreadWorld`."""

    def __init__(self, world: ThreadWorld, rank: int):
        self.world = world
        self.process_index = self.local_process_index = rank
        self.num_processes = world.size
        self.is_main_process = rank == 0
        self.device = torch.device("cpu")

    def reduce(self, tensor, reduction: str = "sum"):
        total = sum(part for part in self.world.exchange(tensor.clone()))
        return total if reduction == "sum" else total / self.num_processes

    def gather(self, tensor):
        return torch.cat([p.reshape(-1) if p.dim() == 0 else p for p in self.world.exchange(tensor.clone())])

    def wait_for_everyone(self):
        self.world.exchange(None)
