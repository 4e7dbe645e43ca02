"""Test-double envs for EnvPool and rollout tests (importable by worker processes, which inherit the test path)."""

import json
import os
import subprocess
import time

from trl_epo.envs.base import StepResult, TaskSpec
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


class FaultyToyEnv(ToyEnv):
    """A toy env that misbehaves on purpose, to test robustness.

    A task whose `extra["fault"]` is ``"raise"``, ``"hang"`` or ``"exit"`` fails at step `extra.get("fault_step", 1)`:
    it raises, sleeps for `hang_seconds`, or kills its own process (process backend only); ``fault_step=0`` with
    ``"raise"`` fails the reset. Other tasks play normally, so a batch can mix healthy and failing episodes.
    """

    def __init__(self, hang_seconds: float = 3600.0, **kwargs):
        super().__init__(**kwargs)
        self.hang_seconds = hang_seconds

    def reset(self, task):
        spec = TaskSpec.from_row(task)
        self.fault = spec.extra.get("fault")
        step = spec.extra.get("fault_step")  # None for healthy rows of a dataset that mixes both
        self.fault_step = 1 if step is None else int(step)
        if self.fault not in (None, "raise", "hang", "exit"):
            raise ValueError(f"fault must be 'raise', 'hang' or 'exit', got {self.fault!r}.")
        if self.fault == "raise" and self.fault_step == 0:
            raise RuntimeError("injected env failure at reset")
        return super().reset(spec)

    def step(self, action: str) -> StepResult:
        if self.fault is not None and self.steps + 1 == self.fault_step:
            if self.fault == "raise":
                raise RuntimeError("injected env failure")
            if self.fault == "hang":
                time.sleep(self.hang_seconds)
            if self.fault == "exit":
                os._exit(17)
        return super().step(action)


class CountdownEnv:
    """Won after `task.variation` valid actions (any action is valid): episodes of chosen, different lengths."""

    def reset(self, task):
        self.left = TaskSpec.from_row(task).variation
        return StepResult(observation=f"Act {self.left} times.", info={"task_description": "Count down."})

    def step(self, action):
        self.left -= 1
        done = self.left <= 0
        return StepResult(observation=f"{self.left} to go.", done=done, won=done)

    def close(self):
        pass
