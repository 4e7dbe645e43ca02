"""Environments stepped in parallel, with per-call timeouts and crash recovery.

An `EnvPool` owns `size` environment *slots*; each slot holds one env instance and plays one episode at a time.
Three backends:

* ``"process"`` (default): one worker process per slot (`worker.WorkerProcess`), each its own process group (an
  env's own child processes, such as ScienceWorld's JVM, live and die with it). A call that raises fails that episode
  and the env is rebuilt on the next reset; a call that runs past its timeout, or a worker that dies, fails that
  episode and the worker is killed (with its whole process group) and restarted on the next reset. Workers exit by
  themselves when the parent process disappears, so no process outlives the trainer.
* ``"thread"``: a thread per slot, for thread-safe, pure-Python envs. A hung call cannot be killed; its env instance
  is abandoned and replaced.
* ``"inline"``: sequential calls in the caller's thread, no timeouts (debugging).

Failures never raise out of the pool: they come back as `StepResult.failure(message)` (``done=True``,
``info["env_error"]`` set), so a batch always completes. Counters of each failure kind are kept in `stats`.
"""

from __future__ import annotations

import contextlib
import pickle
import subprocess
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import wait as wait_connections
from typing import TYPE_CHECKING, Any

from .base import StepResult, TextEnv
from .worker import WorkerProcess


if TYPE_CHECKING:  # annotations only: this module stays standard library at run time
    from typing_extensions import Self

EnvFactory = Callable[[], TextEnv]

BACKENDS = ("process", "thread", "inline")


# --------------------------------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------------------------------


class EnvPool:
    """`size` env slots stepped in parallel. See the module docstring.

    Args:
        env_factory: a zero-argument callable returning a fresh `TextEnv`. With the process backend it must be
            picklable (a class, a module-level function or a `functools.partial` of one; not a lambda).
        size: number of slots (episodes played at the same time).
        backend: ``"process"``, ``"thread"`` or ``"inline"``.
        step_timeout: seconds one `step` may take before the episode is failed (and its worker killed).
        reset_timeout: seconds one `reset` may take (env start-up included); defaults to ``max(120, 4*step_timeout)``.
    """

    def __init__(
        self,
        env_factory: EnvFactory,
        size: int,
        backend: str = "process",
        step_timeout: float = 60.0,
        reset_timeout: float | None = None,
    ):
        if size < 1:
            raise ValueError(f"EnvPool size must be >= 1, got {size}.")
        if backend not in BACKENDS:
            raise ValueError(f"EnvPool backend must be one of {BACKENDS}, got {backend!r}.")
        if step_timeout <= 0:
            raise ValueError(f"step_timeout must be > 0 seconds, got {step_timeout}.")
        self.env_factory = env_factory
        self.size = size
        self.backend = backend
        self.step_timeout = step_timeout
        self.reset_timeout = reset_timeout if reset_timeout is not None else max(120.0, 4 * step_timeout)
        self.stats: Counter[str] = Counter()
        self._closed = False
        if backend == "process":
            try:
                self._factory_bytes = pickle.dumps(env_factory)
            except Exception as error:
                raise TypeError(
                    "The process backend needs a picklable env factory (a class, a module-level function or a "
                    f"functools.partial of one), not {env_factory!r}: {error}. Or use backend='thread'."
                ) from error
            self._workers: list[WorkerProcess | None] = [None] * size
        else:
            self._envs: list[TextEnv | None] = [None] * size
            self._executor = ThreadPoolExecutor(max_workers=size) if backend == "thread" else None
        self._finalizer = weakref.finalize(self, EnvPool._shutdown, self.__dict__)

    # ---- public API
    def reset(self, assignments: Sequence[tuple[int, Any]]) -> list[StepResult]:
        """Start an episode in each given slot: ``[(slot, task), ...]`` -> results in the same order."""
        return self._run("reset", assignments, self.reset_timeout)

    def step(self, actions: Sequence[tuple[int, str]]) -> list[StepResult]:
        """Apply one action in each given slot: ``[(slot, action), ...]`` -> results in the same order."""
        return self._run("step", actions, self.step_timeout)

    def prefetch(self, assignments: Sequence[tuple[int, Sequence[Any]]]) -> None:
        """Hint upcoming tasks to the envs of some slots: ``[(slot, [task, ...]), ...]``. Envs with a
        ``prefetch(tasks)`` method (e.g. ALFWorld's, which translates games in a background thread) prepare them so
        that the later `reset` is fast. Returns at once; never fails (process backend: only running workers get it;
        thread/inline backends: called directly)."""
        if self._closed:
            return
        for slot, tasks in assignments:
            if self.backend == "process":
                worker = self._workers[slot]
                if worker is not None and worker.is_alive():
                    try:
                        worker.conn.send(("prefetch", list(tasks)))
                    except (OSError, EOFError, BrokenPipeError):
                        pass
            else:
                hint = getattr(self._envs[slot], "prefetch", None)
                if callable(hint):
                    with contextlib.suppress(Exception):  # a hint never fails: the real reset reports any problem
                        hint(list(tasks))
        self.stats["prefetch_hints"] += len(assignments)

    def close(self) -> None:
        """Close every env and stop every worker (idempotent)."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def worker_pids(self) -> list[int | None]:
        """PIDs of the live worker processes, by slot (process backend; None where no worker runs)."""
        if self.backend != "process":
            return [None] * self.size
        return [w.pid if w is not None and w.is_alive() else None for w in self._workers]

    # ---- dispatch
    def _run(self, command: str, calls: Sequence[tuple[int, Any]], timeout: float) -> list[StepResult]:
        if self._closed:
            raise RuntimeError("This EnvPool is closed.")
        slots = [slot for slot, _ in calls]
        if len(set(slots)) != len(slots) or any(not 0 <= s < self.size for s in slots):
            raise ValueError(f"Each call needs a distinct slot in [0, {self.size}); got {slots}.")
        self.stats[f"{command}_calls"] += len(calls)
        if self.backend == "process":
            return self._run_processes(command, calls, timeout)
        if self.backend == "thread":
            return self._run_threads(command, calls, timeout)
        return [self._call_inline(command, slot, payload) for slot, payload in calls]

    def _fail(self, kind: str, message: str) -> StepResult:
        self.stats[kind] += 1
        return StepResult.failure(message)

    def _run_processes(self, command, calls, timeout) -> list[StepResult]:
        results: list[StepResult | None] = [None] * len(calls)
        pending = {}
        for index, (slot, payload) in enumerate(calls):
            worker = self._workers[slot]
            if worker is None or not worker.is_alive():
                if command == "step":  # the env's state died with its worker: the episode cannot go on
                    self._discard_worker(slot)
                    results[index] = self._fail("worker_died", "env worker is not running (it died or was killed)")
                    continue
                self._discard_worker(slot)
                worker = self._workers[slot] = WorkerProcess(self._factory_bytes)
                self.stats["worker_starts"] += 1
            try:
                worker.conn.send((command, payload))
            except (OSError, EOFError, BrokenPipeError):
                tail = self._discard_worker(slot)
                results[index] = self._fail("worker_died", f"env worker died (could not send the command).{tail}")
                continue
            pending[worker.conn] = (index, slot)
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            ready = wait_connections(list(pending), timeout=max(0.0, remaining)) if remaining > 0 else []
            if not ready:
                for conn, (index, slot) in pending.items():
                    self._discard_worker(slot)
                    results[index] = self._fail("timeouts", f"env {command} timed out after {timeout:.1f} s")
                break
            for conn in ready:
                index, slot = pending.pop(conn)
                try:
                    status, value = conn.recv()
                except (EOFError, OSError, pickle.UnpicklingError):
                    tail = self._discard_worker(slot)
                    results[index] = self._fail("worker_died", f"env worker died during {command}.{tail}")
                    continue
                if status == "ok":
                    results[index] = value
                else:
                    results[index] = self._fail("env_exceptions", f"env raised during {command}: {value}")
        return results  # type: ignore[return-value]

    def _discard_worker(self, slot: int) -> str:
        """Kill the slot's worker (and its process group); returns the tail of its stderr for error messages."""
        worker, self._workers[slot] = self._workers[slot], None
        if worker is None:
            return ""
        worker.kill()  # first, so that its stderr is complete
        return worker.stderr_tail_after_kill

    def _call_env(self, command: str, slot: int, payload: Any) -> StepResult:
        env = self._envs[slot]
        if env is None:
            if command == "step":
                raise RuntimeError("no env in this slot (it failed earlier); reset it first")
            env = self._envs[slot] = self.env_factory()
        return env.reset(payload) if command == "reset" else env.step(payload)

    def _drop_env(self, slot: int) -> None:
        env, self._envs[slot] = self._envs[slot], None
        if env is not None:
            with contextlib.suppress(Exception):  # the instance is dropped whether or not it closes cleanly
                env.close()

    def _call_inline(self, command, slot, payload) -> StepResult:
        try:
            return self._call_env(command, slot, payload)
        except Exception as error:  # noqa: BLE001 - any env exception fails just that episode
            self._drop_env(slot)
            return self._fail("env_exceptions", f"env raised during {command}: {type(error).__name__}: {error}")

    def _run_threads(self, command, calls, timeout) -> list[StepResult]:
        futures = [self._executor.submit(self._call_env, command, slot, payload) for slot, payload in calls]
        deadline = time.monotonic() + timeout
        results, hung = [], False
        for future, (slot, _) in zip(futures, calls):
            try:
                results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                hung = True
                self._envs[slot] = None  # abandon the hung instance; a fresh one is built on the next reset
                results.append(self._fail("timeouts", f"env {command} timed out after {timeout:.1f} s"))
            except Exception as error:  # noqa: BLE001 - any env exception fails just that episode
                self._drop_env(slot)
                results.append(
                    self._fail("env_exceptions", f"env raised during {command}: {type(error).__name__}: {error}")
                )
        if hung:  # the hung threads keep their executor slots: continue on a fresh executor
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = ThreadPoolExecutor(max_workers=self.size)
        return results

    # ---- shutdown
    @staticmethod
    def _shutdown(state: dict) -> None:
        if state["backend"] == "process":
            workers = [w for w in state["_workers"] if w is not None]
            for worker in workers:
                try:
                    worker.conn.send(("close", None))
                except (OSError, EOFError, BrokenPipeError):
                    pass
            deadline = time.monotonic() + 10.0
            for worker in workers:
                try:
                    worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                worker.kill()  # whatever the env left in its process group (a JVM) goes too
            state["_workers"][:] = [None] * len(state["_workers"])
        else:
            for slot, env in enumerate(state["_envs"]):
                if env is not None:
                    with contextlib.suppress(Exception):  # shutting down: one env's close must not stop the others
                        env.close()
                state["_envs"][slot] = None
            if state.get("_executor") is not None:
                state["_executor"].shutdown(wait=False, cancel_futures=True)
