"""Preemption in process (a real signal raised during a step) and atomic checkpoints under a failing disk: a
kernel-enforced file-size limit (RLIMIT_FSIZE, which binds root too) makes the writes of a checkpoint fail half-way
with EFBIG ("File too large"), as a full disk fails them with ENOSPC."""

import contextlib
import hashlib
import json
import os
import resource
import signal

import pytest
from conftest import base_config_kwargs, count_a_reward
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.checkpointing import CheckpointWriteError
from trl_epo.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_FILE, TrainingPreempted, resolve_signals
from trl_epo.run_files import EPO_STATE_NAME


def make_trainer(make_model, tokenizer, dataset, output_dir, callbacks=(), **overrides):
    args = EPOConfig(**base_config_kwargs(output_dir, **overrides))
    trainer = EPOTrainer(
        make_model(), reward_funcs=count_a_reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


class RaiseSignalAt(TrainerCallback):
    """Raises `sig` (a real signal, delivered to this process) when step `step` begins, or at the end of training."""

    def __init__(self, sig, step=None):
        self.sig, self.step = sig, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            signal.raise_signal(self.sig)

    def on_train_end(self, args, state, control, **kwargs):
        if self.step is None:
            signal.raise_signal(self.sig)


def test_preemption_signals_are_validated(tmp_path):
    assert resolve_signals(["usr1", "SIGTERM", "TERM"]) == [signal.SIGUSR1, signal.SIGTERM]
    assert resolve_signals(["none"]) == [] and resolve_signals([]) == []
    with pytest.raises(ValueError, match="SIGKILL and SIGSTOP cannot be caught"):
        EPOConfig(**base_config_kwargs(tmp_path, preemption_signals=["SIGKILL"]))
    assert EPOConfig(**base_config_kwargs(tmp_path)).preemption_signals == ["SIGTERM"]


def test_a_signal_during_a_step_checkpoints_that_step_and_exits_75(
    make_model, tokenizer, single_turn_dataset, tmp_path
):
    previous = signal.getsignal(signal.SIGUSR1)
    trainer = make_trainer(
        make_model,
        tokenizer,
        single_turn_dataset,
        tmp_path,
        [RaiseSignalAt(signal.SIGUSR1, step=2)],
        max_steps=4,
        preemption_signals=["SIGUSR1"],
    )
    with pytest.raises(TrainingPreempted) as stopped:
        trainer.train()
    assert stopped.value.code == PREEMPTED_EXIT_CODE and stopped.value.global_step == 2
    assert trainer.state.global_step == 2  # the step in flight finished, no further one began
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")  # although save_strategy="no"
    assert json.loads((tmp_path / "checkpoint-2" / EPO_STATE_NAME).read_text())["reference"]["num_updates"] == 2
    record = json.loads((tmp_path / PREEMPTED_FILE).read_text())
    assert record["signal"] == "SIGUSR1" and record["checkpoint"] == str(tmp_path / "checkpoint-2")
    assert signal.getsignal(signal.SIGUSR1) == previous  # the handler lives only while train() runs

    resumed = make_trainer(make_model, tokenizer, single_turn_dataset, tmp_path, max_steps=4)
    resumed.train(resume_from_checkpoint=record["checkpoint"])
    assert resumed.state.global_step == 4 and not (tmp_path / PREEMPTED_FILE).exists()


def test_a_signal_after_the_last_step_reaches_the_previous_handler(
    make_model, tokenizer, single_turn_dataset, tmp_path
):
    received = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    try:
        trainer = make_trainer(
            make_model,
            tokenizer,
            single_turn_dataset,
            tmp_path,
            [RaiseSignalAt(signal.SIGUSR2)],
            max_steps=1,
            preemption_signals=["SIGUSR2"],
        )
        trainer.train()  # the signal came after the last step's check: training is complete, nothing is stopped
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert received == [signal.SIGUSR2] and trainer.state.global_step == 1
    assert not (tmp_path / PREEMPTED_FILE).exists()


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored, so they raise instead of killing us)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


class DiskFailsAtStep(TrainerCallback):
    """From the log of step `step` on (just before its checkpoint is written), files cannot grow past 100 kB (the
    tiny model's weights are 440 kB)."""

    def __init__(self, step, stack):
        self.step, self.stack, self.failing = step, stack, False
        self.saved: dict[int, dict[str, str]] = {}

    def on_log(self, args, state, control, **kwargs):
        if state.global_step == self.step and not self.failing:
            self.failing = True
            self.stack.enter_context(file_size_limit(100_000))

    def on_save(self, args, state, control, **kwargs):
        self.saved[state.global_step] = digest(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


def digest(folder) -> dict[str, str]:
    """A hash of every file of a checkpoint folder."""
    hashes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def test_a_failed_checkpoint_write_leaves_no_half_checkpoint(make_model, tokenizer, single_turn_dataset, tmp_path):
    with contextlib.ExitStack() as stack:
        disk = DiskFailsAtStep(2, stack)
        trainer = make_trainer(
            make_model,
            tokenizer,
            single_turn_dataset,
            tmp_path,
            [disk],
            max_steps=3,
            save_strategy="steps",
            save_steps=1,
        )
        with pytest.raises(CheckpointWriteError) as failed:
            trainer.train()
    message = str(failed.value)
    assert "checkpoint-2" in message and "File too large" in message
    assert f"the latest complete one: {tmp_path / 'checkpoint-1'}" in message and "resume from" in message
    # The previous checkpoint is intact, nothing of checkpoint-2 is where a resume looks, and a resume works.
    assert list(disk.saved) == [1] and digest(tmp_path / "checkpoint-1") == disk.saved[1]
    assert sorted(p for p in os.listdir(tmp_path) if "checkpoint" in p) == ["checkpoint-1"]
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1")
    resumed = make_trainer(make_model, tokenizer, single_turn_dataset, tmp_path, max_steps=3, save_strategy="no")
    resumed.train(resume_from_checkpoint=get_last_checkpoint(str(tmp_path)))
    assert resumed.state.global_step == 3
