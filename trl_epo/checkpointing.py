"""Atomic checkpoints: a `checkpoint-N` folder appears complete, or not at all.

transformers 5.x's `Trainer._save_checkpoint` writes straight into `<output_dir>/checkpoint-N` (it no longer stages
it), so a crash, a full disk or a lost mount in the middle of a save leaves a half-written `checkpoint-N` that
`transformers.trainer_utils.get_last_checkpoint` (and `resume_from_checkpoint=True`) would take as the newest
checkpoint. `EPOTrainer` therefore has every process write the checkpoint into `<output_dir>/.tmp-checkpoint-N/
checkpoint-N` (a name `get_last_checkpoint` never matches: it takes `^checkpoint-\\d+$` only), fsyncs it, and renames
it to `<output_dir>/checkpoint-N` (one `rename` on the same filesystem: atomic) only after all processes wrote their
part without error.

A failed write (no space left, a read-only or vanished folder, a file-size limit) raises `CheckpointWriteError` on
every process (the processes agree on the outcome, so none waits for a process that gave up) with the cause and the
latest complete checkpoint; the staging folder is removed and the earlier checkpoints are untouched. Under DeepSpeed,
whose own checkpoint code runs collectives, a process that fails inside them can leave the others waiting there
until the launcher stops them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints


STAGING_PREFIX = ".tmp-"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; nothing half-written is left where a resume would look."""


def staging_root(run_dir: str, name: str) -> str:
    """The folder a checkpoint `name` is written into before it is renamed into `run_dir`."""
    return os.path.join(run_dir, STAGING_PREFIX + name)


def _fsync_tree(folder: str) -> None:
    """Flush every file and folder under `folder` to disk, so that the rename never publishes unwritten data."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(staged: str, final: str) -> None:
    """Rename `staged` to `final`; an existing `final` (the same step saved again) is replaced."""
    _fsync_tree(staged)
    if os.path.exists(final):
        old = staging_root(os.path.dirname(final), os.path.basename(final)) + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    fd = os.open(os.path.dirname(final), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_checkpoint(
    run_dir: str,
    name: str,
    is_writer: bool,
    barrier: Callable[[], None],
    all_ok: Callable[[bool], bool],
    process_index: int = 0,
) -> Iterator[str]:
    """Stage the checkpoint `run_dir/name`: yields the folder to write `name` into (`staging_root`), then publishes it.

    Every process enters and leaves it at the same point. `is_writer`: the process that cleans up and renames
    (`args.should_save`); `barrier()`: all processes wait; `all_ok(ok) -> bool`: whether every process wrote its part.
    """
    root = staging_root(run_dir, name)
    if is_writer:
        shutil.rmtree(root, ignore_errors=True)  # a crashed earlier attempt at this step
    barrier()
    error: BaseException | None = None
    try:
        yield root
    except Exception as caught:  # noqa: BLE001 - reported below, on every process, with the cause
        error = caught
    if all_ok(error is None) and is_writer:
        try:
            _publish(os.path.join(root, name), os.path.join(run_dir, name))
            os.rmdir(root)
        except Exception as caught:  # noqa: BLE001 - as above
            error = caught
    if all_ok(error is None):
        return
    if is_writer:
        shutil.rmtree(root, ignore_errors=True)  # frees the space a full disk needs back
    latest = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    where = f"process {process_index}: {type(error).__name__}: {error}" if error else "another process"
    raise CheckpointWriteError(
        f"Could not write the checkpoint {os.path.join(run_dir, name)} (failed on {where}). Nothing half-written was "
        f"left in its place, and the earlier checkpoints are intact (the latest complete one: {latest}). Free disk "
        "space or make the output folder writable, then resume from that checkpoint."
    ) from error


class AtomicCheckpointMixin:
    """`Trainer._save_checkpoint`, atomic (see the module docstring); a mixin of `EPOTrainer` only. Subclasses add
    their files to the staged folder in `_save_checkpoint_extras(folder)` (called on every process)."""

    _checkpoint_staging: str | None = None

    def _get_output_dir(self, trial):
        # While a checkpoint is written, transformers' `_save_checkpoint` writes into the staging folder.
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        accelerator = self.accelerator

        def all_ok(ok: bool) -> bool:
            if accelerator.num_processes == 1:
                return ok
            flags = accelerator.gather(torch.tensor([int(ok)], device=accelerator.device))
            return bool(flags.min().item())

        with atomic_checkpoint(
            run_dir, name, self.args.should_save, accelerator.wait_for_everyone, all_ok, accelerator.process_index
        ) as staging:
            self._checkpoint_staging = staging
            try:
                super()._save_checkpoint(model, trial)
                best = self.state.best_model_checkpoint
                if best and best.startswith(staging):  # recorded under the staging name: record the final one
                    self.state.best_model_checkpoint = run_dir + best[len(staging) :]
                    if self.args.should_save:
                        self.state.save_to_json(os.path.join(staging, name, "trainer_state.json"))
                self._save_checkpoint_extras(os.path.join(staging, name))
            finally:
                self._checkpoint_staging = None
        if self.args.should_save:  # transformers rotated the staging folder; rotate the real one
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)

    def _save_checkpoint_extras(self, folder: str) -> None:
        """Write this trainer's own files into the (staged) checkpoint `folder`; every process calls it."""
