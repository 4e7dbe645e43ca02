"""Envs for EnvPool tests (importable by worker processes)."""

import json
import os
import subprocess

from trl_epo.envs.base import StepResult
from trl_epo.envs.toy import ToyEnv


class ChildProcessEnv(ToyEnv):
    """Starts a long-lived child process at construction (like ScienceWorld's JVM) and reports its pid."""

    def __init__(self):
        super().__init__()
        self.child = subprocess.Popen(["sleep", "1000"])

    def reset(self, task):
        result = super().reset(task)
        result.info["child_pid"] = self.child.pid
        result.info["worker_pid"] = os.getpid()
        return result

    def close(self):
        self.child.kill()
        self.child.wait()


class PrefetchRecordingEnv(ToyEnv):
    """Appends every prefetch hint to a JSON-lines file."""

    def __init__(self, log_path):
        super().__init__()
        self.log_path = log_path

    def prefetch(self, tasks):
        with open(self.log_path, "a") as f:
            f.write(json.dumps([dict(t) if not hasattr(t, "to_row") else t.to_row() for t in tasks]) + "\n")

    def step(self, action):
        return StepResult(observation="ok", done=True, won=True, info={"score": 100.0})


class ExitingEnv(ToyEnv):
    """Writes a message to stderr and exits the process at construction (an env that cannot start)."""

    def __init__(self, message):
        import sys

        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        os._exit(3)
