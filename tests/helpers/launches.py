"""Real training subprocesses for the multi-process tests: a script (`examples/train_toy.py` by default) in one process,
or under `accelerate launch --num_processes 2` (DDP over gloo on the CPU, or DeepSpeed), started in a session of its
own so that a hung launch is stopped with all its processes; and the process tree around them (rank processes, env
workers)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
TRAIN_TOY = str(REPO / "examples" / "train_toy.py")

# A short run of the toy env with a tiny model: 6 optimizer steps, K = 3 updates per rollout (rollouts at steps 0
# and 3), no periodic checkpoint; enough tasks that 2 processes never cross an epoch boundary.
TOY_FLAGS = [
    "--model_name_or_path", "tiny",
    "--bf16", "false",
    "--use_cpu",
    "--max_steps", "6",
    "--env_updates_per_rollout", "3",
    "--per_device_train_batch_size", "6",
    "--num_generations", "2",
    "--max_completion_length", "96",
    "--env_max_turns", "3",
    "--env_max_turn_tokens", "8",
    "--env_pool_size", "3",
    "--num_tasks", "64",
    "--learning_rate", "1e-2",
    "--logging_steps", "1",
    "--save_strategy", "no",
    "--report_to", "none",
    "--disable_tqdm", "true",
    "--seed", "0",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_tiny_model(path: Path) -> str:
    """The tiny base model and tokenizer `train_toy.py` builds for `--model_name_or_path tiny`, saved once, so that
    concurrent runs do not build it at the same time."""
    from trl_epo.tiny import build_tiny_model, build_tiny_tokenizer

    if not (path / "config.json").exists():
        tokenizer = build_tiny_tokenizer()
        build_tiny_model(tokenizer, hidden_size=64, num_layers=2, seed=0).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


def accelerate_command(script: str, processes: int = 2, config: str = "multi_gpu.yaml") -> list[str]:
    """`accelerate launch` of `script` on `processes` processes with the shipped `examples/accelerate/<config>`, on a
    free port (no mixed precision: the CPU runs in float32)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "examples" / "accelerate" / config),
        "--num_processes", str(processes),
        "--mixed_precision", "no",
        "--main_process_port", str(free_port()),
        script,
    ]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    """The environment of a run: offline, this checkout's code, one thread."""
    return dict(
        os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
    )


def launch_two_processes(
    script: str, args, config: str = "multi_gpu.yaml", timeout: float = 420
) -> subprocess.CompletedProcess:
    """Run `script args` under `accelerate launch --num_processes 2` (`config`), in a session of its own, so that a
    hung launch is stopped with all its worker processes (the test fails after `timeout` s); its captured output."""
    command = [*accelerate_command(script, 2, config), *map(str, args)]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"launch timed out after {timeout:.0f}s:\n{stdout[-4000:]}\n{stderr[-8000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def start(output_dir, flags, processes: int = 1, script: str = TRAIN_TOY, log_name: str = "") -> subprocess.Popen:
    """Start `script` with `flags` in 1 process or 2 (accelerate launch, DDP on the CPU over gloo); its output goes
    to `<output_dir><log_name>.log`."""
    command = [sys.executable, script] if processes == 1 else accelerate_command(script, processes)
    command += ["--output_dir", str(output_dir), *flags]
    log = open(Path(f"{output_dir}{log_name}.log"), "w")  # noqa: SIM115 - closed by finish()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    process.log_path = log.name
    process.log_file = log
    return process


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for the run (killing its whole session after `timeout` s: a hang fails the test); (exit status, log)."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.log_file.close()
        pytest.fail(
            f"the run did not end within {timeout:.0f} s (a hang):\n{Path(process.log_path).read_text()[-6000:]}"
        )
    process.log_file.close()
    return process.returncode, Path(process.log_path).read_text()


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None, poll: float = 0.02):
    """Poll `predicate()` until it returns something truthy; fail after `timeout` s or when `process` ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(
                f"the run ended (status {process.returncode}) before {what}:\n{Path(process.log_path).read_text()[-6000:]}"
            )
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def children(pid: int) -> list[int]:
    """The direct child processes of `pid` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of training process `rank` under an accelerate/torchrun launcher (its RANK environment variable)."""
    for pid in children(launcher_pid):
        if environ(pid).get("RANK") == str(rank):
            return pid
    return None


def env_worker_pids(trainer_pid: int) -> list[int]:
    """The live `EnvPool` worker processes of a training process."""
    return [pid for pid in children(trainer_pid) if "trl_epo.envs.worker" in cmdline(pid)]
