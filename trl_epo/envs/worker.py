"""An `EnvPool` worker process: the loop it runs (`serve`) and the pool's handle on it (`WorkerProcess`).

A worker is a fresh interpreter (no re-import of the trainer's ``__main__``, no fork of its threads) in its own
session / process group, talking to the pool over a socket pair. It builds its env from the pickled factory, answers
``reset`` / ``step`` commands, takes ``prefetch`` hints, and exits when the pool closes it or the parent dies.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Connection


def _watch_parent(parent_pid: int) -> None:
    """Kill this worker's process group when the parent dies (even if the env is stuck in a call)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os.killpg(os.getpgrp(), signal.SIGKILL)


def serve(fd: int, parent_pid: int) -> None:
    """The worker process's loop, on the socket `fd` (started by `WorkerProcess` through `_BOOTSTRAP`)."""
    conn = Connection(fd)
    # Ctrl-C and the preemption signals go to the trainer, which finishes its step and closes the pool (SLURM signals
    # every process of a job step): the episode in flight must not die first. The pool kills with SIGKILL.
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        factory = pickle.loads(conn.recv_bytes())
    except Exception as error:  # noqa: BLE001 - e.g. the factory's module cannot be imported here: tell the pool
        conn.send(("error", f"could not load the env factory in the worker: {type(error).__name__}: {error}"))
        conn.close()
        return
    env = None
    while True:
        try:
            command, payload = conn.recv()
        except (EOFError, OSError):
            break
        if command == "close":
            break
        if command == "prefetch":  # a hint, no reply: let the env prepare upcoming tasks in the background
            with contextlib.suppress(Exception):  # a failed hint costs nothing: the real reset reports any problem
                if env is None:
                    env = factory()
                hint = getattr(env, "prefetch", None)
                if callable(hint):
                    hint(payload)
            continue
        try:
            if env is None:
                env = factory()
            result = env.reset(payload) if command == "reset" else env.step(payload)
            conn.send(("ok", result))
        except Exception as error:  # noqa: BLE001 - the env failed: report, drop the instance, keep the worker
            message = f"{type(error).__name__}: {error}"
            try:
                conn.send(("error", message + "\n" + traceback.format_exc(limit=5)))
            except (OSError, EOFError):
                break
            if env is not None:
                with contextlib.suppress(Exception):  # the instance is dropped whether or not it closes cleanly
                    env.close()
            env = None
    try:
        if env is not None:
            env.close()
    finally:
        conn.close()


_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv[3]); "
    "from trl_epo.envs.worker import serve; serve(int(sys.argv[1]), int(sys.argv[2]))"
)
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WorkerProcess:
    """A worker process: a fresh interpreter (no re-import of the trainer's __main__, no fork of its threads) in its
    own session/process group, talking over a socket pair. It imports this very `trl_epo` (not whatever another
    checkout in the working directory holds) and sees the parent's import path. Its stderr goes to a temporary file
    whose tail is quoted when the worker dies."""

    def __init__(self, factory_bytes: bytes):
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker; kill() closes it
        self.stderr_tail_after_kill = ""
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, str(child_sock.fileno()), str(os.getpid()), _PACKAGE_ROOT],
            pass_fds=(child_sock.fileno(),),
            start_new_session=True,
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=self.stderr,
        )
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        # The worker answers its first command once the factory is loaded. If it died at start, sending fails here
        # and the first command reports it, with its stderr.
        with contextlib.suppress(OSError, EOFError):
            self.conn.send_bytes(factory_bytes)

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def stderr_tail(self, limit: int = 1500) -> str:
        """The end of what the worker wrote to stderr (empty when nothing)."""
        try:
            self.stderr.seek(0, os.SEEK_END)
            size = self.stderr.tell()
            self.stderr.seek(max(0, size - limit))
            text = self.stderr.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""
        return f" Worker stderr (end): {text}" if text else ""

    def kill(self) -> None:
        for target in (lambda: os.killpg(self.process.pid, signal.SIGKILL), self.process.kill):
            try:
                target()
            except (ProcessLookupError, PermissionError, OSError):
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        self.conn.close()
        if not self.stderr.closed:
            self.stderr_tail_after_kill = self.stderr_tail()
            self.stderr.close()
