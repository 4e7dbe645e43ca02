"""Preemption: on a configured signal (SLURM, spot machines, `kill`), finish the optimizer step, checkpoint, close the
env workers and exit with `PREEMPTED_EXIT_CODE`.

How it works (all of it a `TrainerCallback` plus two lines in `EPOTrainer.train`):

* While `train()` runs, the signals of `EPOConfig.preemption_signals` only set a flag (`PreemptionWatcher`): nothing
  is interrupted, the step in flight (its rollout included) completes.
* After every optimizer step, `PreemptionCallback.on_step_end` gathers the flags of all processes (one tiny
  collective per step), so all processes decide to stop at the same step, even when only one of them got the
  signal. Then TRL/transformers' own machinery does the rest: `control.should_save` writes a normal checkpoint
  (also under `save_strategy="no"`; `EPOTrainer._save_checkpoint` adds the entropy reference and, inside a
  rollout's K updates, the rest of the rollout), and `control.should_training_stop` ends the loop. An evaluation
  due at that step is skipped (the grace period is for saving).
* `EPOTrainer.train` then closes the env workers, writes `epo_preempted.json` next to the checkpoints (signal, step,
  checkpoint), waits for all processes, releases the process group and raises `TrainingPreempted` (a `SystemExit`
  with code 75, `EX_TEMPFAIL` of sysexits.h: "temporary failure, retry"), so a script ends there (no final
  evaluation, no final `save_model`), and a requeue script can tell a preemption from a crash (1) or a finished run
  (0). `accelerate launch` / torchrun report a failed child with their own exit code 1 and name each rank's code 75
  in their error summary: there, test for `epo_preempted.json`.

Resume with `trainer.train(resume_from_checkpoint=<the checkpoint>)` (or `--resume_from_checkpoint` of the example
scripts): it continues exactly where the uninterrupted run would be.

Why SIGTERM is on by default: without a handler, SIGTERM kills the process mid-step and everything since the last
checkpoint is lost (with `save_strategy="no"`, the whole run). With it, the process still ends, one optimizer step
later, with a checkpoint; a second SIGTERM (torchrun's agent forwards the one it gets) changes nothing, and SIGKILL,
which schedulers send after their grace period, cannot be caught. A signal that arrives after the last optimizer step
is delivered again, to the previous handler, when `train()` returns, so the process behaves as it would without the
feature. Handlers can only be installed in the main thread: elsewhere the feature is off, with a warning.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator

from transformers import TrainerCallback


PREEMPTED_EXIT_CODE = 75
"""The exit status of a preempted run (EX_TEMPFAIL): a checkpoint was saved, resume from it."""
PREEMPTED_FILE = "epo_preempted.json"
"""Written next to the checkpoints by a preempted run: {"signal", "global_step", "max_steps", "checkpoint"}."""
SUPPORTED_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


class TrainingPreempted(SystemExit):
    """Raised by `EPOTrainer.train` after a preemption checkpoint; exits the process with `PREEMPTED_EXIT_CODE`."""

    def __init__(self, checkpoint: str, signal_name: str, global_step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.checkpoint, self.signal_name, self.global_step = checkpoint, signal_name, global_step

    def __str__(self) -> str:
        return (
            f"preempted by {self.signal_name}: saved {self.checkpoint} at step {self.global_step}; resume with "
            f"resume_from_checkpoint={self.checkpoint!r} (exit status {PREEMPTED_EXIT_CODE})"
        )


def resolve_signals(names) -> list[signal.Signals]:
    """The signals named in `names` ("SIGTERM" or "TERM", any case); a clear error for anything else."""
    if isinstance(names, str):
        names = [names]
    names = [n for n in names or [] if str(n).strip().lower() not in ("none", "")]  # ["none"]: off, from the CLI
    resolved = []
    for name in names:
        key = str(name).strip().upper()
        key = key if key.startswith("SIG") else "SIG" + key
        if key not in SUPPORTED_SIGNALS or not hasattr(signal, key):
            raise ValueError(
                f"preemption_signals: {name!r} is not a signal a run can be preempted with; use some of "
                f"{list(SUPPORTED_SIGNALS)} (SIGKILL and SIGSTOP cannot be caught), or [] / ['none'] to turn preemption off."
            )
        resolved.append(signal.Signals[key])
    return list(dict.fromkeys(resolved))


class PreemptionWatcher:
    """Records the first configured signal that arrives while `armed()`; the handler only sets a flag."""

    def __init__(self, names):
        self.signals = resolve_signals(names)
        self.received: signal.Signals | None = None
        self.acted_on = False  # set once training stopped for it (the signal is then not delivered again)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        previous = {}
        if self.signals and threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "Preemption handling is off: signal handlers can only be installed in the main thread, and train() "
                "runs in another one. Call train() from the main thread, or set preemption_signals=[].",
                stacklevel=3,
            )
        elif self.signals:
            previous = {s: signal.signal(s, self._handle) for s in self.signals}
        self.received, self.acted_on = None, False
        try:
            yield
        except BaseException:  # training failed: its error is what the process reports, not a signal on the way out
            self._restore(previous)
            raise
        self._restore(previous)
        late = self.received
        if late is not None and not self.acted_on and late in previous:
            signal.raise_signal(late)  # after the last step's check: what would have happened without us

    @staticmethod
    def _restore(previous: dict) -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)


class PreemptionCallback(TrainerCallback):
    """After every optimizer step, stop training (with a checkpoint) on every process once any process got a signal.

    `agree(signum) -> signum`: the largest signal number over all processes (0 = none); a collective, called by
    every process after every optimizer step."""

    def __init__(self, watcher: PreemptionWatcher, agree: Callable[[int], int]):
        self.watcher, self.agree = watcher, agree
        self.signal: signal.Signals | None = None  # the signal training stopped for
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.signal, self.stopped_at = None, None

    def on_step_end(self, args, state, control, **kwargs):
        if not self.watcher.signals or self.stopped_at is not None:
            return control
        local = int(self.watcher.received) if self.watcher.received is not None else 0
        agreed = self.agree(local)
        if agreed:
            self.signal, self.stopped_at = signal.Signals(agreed), state.global_step
            self.watcher.acted_on = True
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # saved at the step already; no epoch-end evaluation either
            control.should_save = False
            control.should_evaluate = False
        return control


def exit_preempted(trainer, stop: PreemptionCallback) -> None:
    """After the preemption checkpoint: write `epo_preempted.json`, wait for every process, release the process
    group (`trainer.end()`) and raise `TrainingPreempted`. The env workers are closed already."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from .run_files import write_json_atomic

    args = trainer.args
    checkpoint = os.path.abspath(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{stop.stopped_at}"))
    preempted = TrainingPreempted(checkpoint, stop.signal.name, stop.stopped_at)
    if args.should_save:
        record = {
            "signal": stop.signal.name,
            "global_step": stop.stopped_at,
            "max_steps": trainer.state.max_steps,
            "checkpoint": checkpoint,
            "exit_status": PREEMPTED_EXIT_CODE,
        }
        write_json_atomic(os.path.join(args.output_dir, PREEMPTED_FILE), record)
    trainer.accelerator.print(str(preempted), flush=True)
    trainer.accelerator.wait_for_everyone()  # no process exits before all have written their part of the checkpoint
    trainer.end()
    raise preempted
