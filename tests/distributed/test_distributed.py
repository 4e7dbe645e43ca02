"""Real multi-process EPO runs: `accelerate launch --num_processes 2` with the shipped DDP and DeepSpeed ZeRO-2 /
ZeRO-3 / ZeRO-3-offload configs (gloo, CPU), the toy multi-turn env and a tiny model, through `examples/train_toy.py`'s
trainer. DDP runs on the CPU through `multi_gpu.yaml` with `--use_cpu` (gloo).

Each launch (tests/distributed_epo_run.py) trains 2 optimizer steps with a checkpoint per step, then resumes a fresh
trainer from checkpoint-1; every process writes a report. Checked here: both steps finish with finite losses; the EPO
reference is identical on both processes although their local entropies differ, and equals the global token mean; under
ZeRO-3 the full weights are gathered exactly once per rollout while the rollout makes one generate call per turn, and
processes whose episodes end earlier stay in step; the checkpoints carry the reference and the resumed run reproduces
it; the saved model is whole (ZeRO-3 gathers it). The LoRA run also exports the adapter alone and the merged model from
ZeRO-3 shards. Launches that would make each process train alone fail at construction with advice.
"""

import json
import math
import os
import subprocess
import time

import pytest
import torch
from helpers.launches import REPO, launch_two_processes


TIMEOUT_S = 420

COMMON_FLAGS = [
    "--model_name_or_path",
    "tiny",
    "--bf16",
    "false",
    "--ddp_backend",
    "gloo",  # no GPU: accelerate needs the backend named for DeepSpeed on CPU
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "4",
    "--num_generations",
    "2",
    "--max_completion_length",
    "96",
    "--env_max_turns",
    "3",
    "--env_max_turn_tokens",
    "8",
    "--env_pool_backend",
    "thread",
    "--num_tasks",
    "8",
    "--learning_rate",
    "1e-2",
    "--logging_steps",
    "1",
    "--save_strategy",
    "steps",
    "--save_steps",
    "1",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--seed",
    "0",
]


def run_launch(config: str, output_dir, flags, export_dir=None) -> subprocess.CompletedProcess:
    args = ["--report_dir", os.path.join(output_dir, "reports"), "--output_dir", output_dir, *flags]
    if export_dir is not None:
        args += ["--export_dir", export_dir]
    return launch_two_processes(
        str(REPO / "tests" / "distributed" / "distributed_epo_run.py"), args, config, TIMEOUT_S
    )


def launch(config: str, output_dir, extra_flags=(), export_dir=None) -> dict[int, dict]:
    report_dir = os.path.join(output_dir, "reports")
    start = time.perf_counter()
    result = run_launch(config, output_dir, [*COMMON_FLAGS, *extra_flags], export_dir)
    elapsed = time.perf_counter() - start
    output = f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    assert result.returncode == 0, f"launch failed after {elapsed:.0f}s:\n{output}"
    reports = {}
    for rank in (0, 1):
        with open(os.path.join(report_dir, f"rank{rank}.json")) as f:
            reports[rank] = json.load(f)
    return reports


def check_run(reports, output_dir, zero_stage, gathered, uneven=False):
    r0, r1 = reports[0], reports[1]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["zero_stage"] == r1["zero_stage"] == zero_stage

    # 2 optimizer steps, finite losses, identical logs on both processes (metrics are reduced).
    for report in (r0, r1):
        trained = report["trained"]
        assert trained["global_step"] == 2
        assert len(trained["losses"]) == 2 and all(math.isfinite(x) for x in trained["losses"])
    assert r0["trained"]["losses"] == r1["trained"]["losses"]

    # The EPO reference: identical on both processes, two updates, each the *global* token-mean entropy of its step,
    # although each process saw different episodes (its local sums differ).
    reference = r0["trained"]["reference"]
    assert reference == r1["trained"]["reference"]
    assert reference["num_updates"] == 2 and all(math.isfinite(h) for h in reference["history"])
    local0, local1 = r0["trained"]["local_steps"], r1["trained"]["local_steps"]
    assert len(local0) == len(local1) == 2
    assert any(a["sum"] / a["count"] != b["sum"] / b["count"] for a, b in zip(local0, local1))
    for step, (a, b) in enumerate(zip(local0, local1)):
        assert reference["history"][step] == pytest.approx((a["sum"] + b["sum"]) / (a["count"] + b["count"]), rel=1e-6)

    # Generation: one unwrap (and, when gathering under ZeRO-3, one gather of all weights) per rollout, several turns
    # per rollout; the processes make the same number of generate calls (lockstep), even when one of them runs out of
    # live episodes earlier (uneven: process 0's episodes end after 2 turns, process 1's after 3).
    for report in (r0, r1):
        rollouts = report["trained"]["rollouts"]
        assert len(rollouts) == 2
        for rollout in rollouts:
            assert rollout["unwraps"] == 1
            assert rollout["generate_calls"] >= 2 and rollout["max_turns"] >= 2
            assert rollout["gathers"] == ([report["num_model_params"]] if gathered else [])
            if uneven:
                assert rollout["max_turns"] == rollout["generate_calls"] == 2 + report["rank"]
    calls = [[r["all_generate_calls"] for r in report["trained"]["rollouts"]] for report in (r0, r1)]
    assert calls[0] == calls[1]
    if uneven:
        assert calls[0] == [3, 3]  # process 0 made one empty call per rollout to follow process 1

    # Checkpoints carry the reference; the resumed run restores it and reproduces the uninterrupted one.
    for step in (1, 2):
        state = json.loads((output_dir / f"checkpoint-{step}" / "epo_state.json").read_text())
        assert state["reference"]["num_updates"] == step
        assert state["reference"]["history"] == reference["history"][:step]
    for report in (r0, r1):
        resumed = report["resumed"]
        assert resumed["global_step"] == 2 and len(resumed["rollouts"]) == 1  # only step 2 was trained again
        assert resumed["reference"]["num_updates"] == 2
        assert resumed["reference"]["history"][0] == reference["history"][0]
        assert resumed["reference"]["history"][1] == pytest.approx(reference["history"][1], rel=1e-5)
        assert resumed["losses"][-1] == pytest.approx(r0["trained"]["losses"][-1], rel=1e-4, abs=1e-7)
    assert r0["resumed"]["reference"] == r1["resumed"]["reference"]


def tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


UNEVEN = ["--uneven_turns", "--max_completion_length", "200"]  # room for 3 turns


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, zero_stage, extra, gathered, uneven",
    [
        ("multi_gpu.yaml", 0, ["--use_cpu", "true"], False, False),  # DDP; on CPU: gloo
        ("zero2.yaml", 2, [], False, False),
        ("zero3.yaml", 3, ["--ds3_gather_for_generation", "false", *UNEVEN], False, True),
        ("zero3_offload.yaml", 3, ["--gradient_checkpointing", "true"], True, False),
    ],
    ids=["ddp-cpu", "zero2", "zero3-sharded-generation-uneven-turns", "zero3-offload-gradient-checkpointing"],
)
def test_deepspeed_two_processes_full_finetuning(tmp_path, config, zero_stage, extra, gathered, uneven):
    output_dir = tmp_path / "run"
    reports = launch(config, output_dir, extra)
    check_run(reports, output_dir, zero_stage, gathered=gathered, uneven=uneven)
    # The final model was saved whole (ZeRO-3 gathers the 16-bit weights) and training changed it.
    base = tensors(output_dir / "_tiny_base" / "model.safetensors")
    final = tensors(output_dir / "model.safetensors")
    assert set(base) <= set(final) <= set(base) | {"lm_head.weight"}  # ZeRO-2 also writes the tied head
    assert all(final[k].shape == base[k].shape for k in base)
    if "lm_head.weight" in final:  # the tie held during training
        assert torch.equal(final["lm_head.weight"], final["model.embed_tokens.weight"])
    assert any(not torch.equal(final[k], base[k]) for k in base)


@pytest.mark.slow
def test_ddp_resume_at_an_epoch_boundary_plays_the_same_tasks(tmp_path):
    """4 tasks x G 2 = 8 episodes, 4 per process: one rollout is one epoch, so checkpoint-1 is an epoch boundary. The
    resumed run's rollout plays epoch 1's tasks (TRL's sampler used to start again from epoch 0's shuffle, on each
    process) and ends with the uninterrupted run's loss."""
    output_dir = tmp_path / "run"
    reports = launch("multi_gpu.yaml", output_dir, ["--use_cpu", "true", "--num_tasks", "4"])
    assert json.loads((output_dir / "checkpoint-1" / "trainer_state.json").read_text())["epoch"] == 1.0
    for report in reports.values():
        trained, resumed = report["trained"]["rollouts"], report["resumed"]["rollouts"]
        assert len(trained) == 2 and len(resumed) == 1
        assert trained[0]["tasks"] != trained[1]["tasks"]  # epochs 0 and 1 are shuffled differently
        assert resumed[0]["tasks"] == trained[1]["tasks"]
        assert report["resumed"]["losses"][-1] == pytest.approx(report["trained"]["losses"][-1], rel=1e-5, abs=1e-7)
    assert reports[0]["resumed"]["rollouts"][0]["tasks"] != reports[1]["resumed"]["rollouts"][0]["tasks"]


@pytest.mark.slow
def test_k_updates_per_rollout_with_different_row_counts_per_process(tmp_path):
    """ZeRO-3, windowed episodes trained one row per turn, 3 optimizer steps per rollout; process 0's episodes end
    after 2 turns and process 1's after 3, so the processes hold different numbers of rows (and of forward chunks):
    every row is trained exactly once, nothing hangs, the EPO reference is the same on both processes, and a resume
    from the checkpoint inside the rollout finishes it on the saved rows."""
    output_dir = tmp_path / "run"
    flags = [
        "--env_history_turns",
        "1",
        "--env_updates_per_rollout",
        "3",
        "--per_device_train_batch_size",
        "2",
        "--max_steps",
        "3",
        "--env_forward_token_budget",
        "256",
        *UNEVEN,
        "--max_completion_length",
        "800",
    ]
    reports = launch("zero3.yaml", output_dir, flags)
    r0, r1 = reports[0], reports[1]
    for report in (r0, r1):
        trained = report["trained"]
        assert trained["global_step"] == 3 and len(trained["rollouts"]) == 1  # one rollout, three optimizer steps
        assert trained["rows_trained_once"]
        assert trained["reference"]["num_updates"] == 3
        assert report["resumed"]["global_step"] == 3 and report["resumed"]["rollouts"] == []  # the saved rows
    assert r0["trained"]["rows_scheduled"] != r1["trained"]["rows_scheduled"]  # different row counts per process
    assert r0["trained"]["reference"] == r1["trained"]["reference"]
    assert r0["resumed"]["reference"] == r1["resumed"]["reference"]
    assert r0["resumed"]["reference"]["history"] == pytest.approx(r0["trained"]["reference"]["history"], rel=1e-5)
    assert (output_dir / "checkpoint-1" / "epo_rollout_buffer_rank1.safetensors").exists()


@pytest.mark.slow
def test_deepspeed_zero3_lora_exports_adapter_and_merged_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output_dir, export_dir = tmp_path / "run", tmp_path / "export"
    flags = [
        "--use_peft",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--lora_target_modules",
        "all-linear",
        "--beta",
        "0.04",  # beta > 0: the KL reference is the policy with its adapter disabled
        *UNEVEN,
    ]
    reports = launch("zero3.yaml", output_dir, flags, export_dir=export_dir)
    check_run(reports, output_dir, zero_stage=3, gathered=True, uneven=True)
    for report in reports.values():
        assert all(math.isfinite(x) for x in report["trained"]["losses"])

    # The adapter alone: only LoRA weights, whole (gathered), changed by training.
    adapter = tensors(export_dir / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    assert all(t.numel() > 0 for t in adapter.values())
    assert any("lora_B" in key and t.abs().sum() > 0 for key, t in adapter.items())  # B starts at zero
    assert (export_dir / "adapter" / "README.md").exists()

    # The merged model equals PEFT's own merge of that adapter into the base model.
    base = AutoModelForCausalLM.from_pretrained(output_dir / "_tiny_base", dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, export_dir / "adapter").merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(export_dir / "merged", dtype=torch.float32).state_dict()
    assert set(merged) == set(expected)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=1e-6, msg=key)
    card = (export_dir / "merged" / "README.md").read_text()
    assert "merged" in card and "DeepSpeed ZeRO-3 over 2 process(es)" in card


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, drop_backend, message, advice",
    [
        ("zero2.yaml", True, "accelerate sees 1", "--ddp_backend gloo"),
        ("multi_gpu.yaml", False, "no distributed mode", "--use_cpu"),
    ],
    ids=["deepspeed-without-backend", "multi-gpu-config-without-gpus"],
)
def test_processes_that_would_train_alone_fail_clearly(tmp_path, config, drop_backend, message, advice):
    # Without GPUs, these launches start 2 processes that accelerate does not connect: each would train alone (and end
    # with its own EPO reference). EPOTrainer stops at construction and says what to do.
    flags = list(COMMON_FLAGS)
    if drop_backend:
        i = flags.index("--ddp_backend")
        del flags[i : i + 2]
    result = run_launch(config, tmp_path / "run", flags)
    assert result.returncode != 0
    assert message in result.stderr and advice in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoint-1").exists()


PPO_FLAGS = [
    "--trainer",
    "ppo",
    "--num_generations",
    "1",  # PPO plays distinct tasks
    "--num_tasks",
    "32",  # more than one rollout per epoch (resuming at an epoch boundary would replay other tasks)
    "--critic_learning_rate",
    "1e-3",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, zero_stage, extra",
    [
        ("multi_gpu.yaml", 0, ["--use_cpu", "true", "--gradient_accumulation_steps", "2"]),
        ("zero2.yaml", 2, ["--gradient_accumulation_steps", "2"]),
        (
            "zero3.yaml",
            3,
            ["--env_history_turns", "1", "--env_updates_per_rollout", "2", "--per_device_train_batch_size", "2"],
        ),
    ],
    ids=["ddp-cpu-gradient-accumulation", "zero2-gradient-accumulation", "zero3-step-rows-2-updates-per-rollout"],
)
def test_ppo_critic_is_identical_on_both_processes(tmp_path, config, zero_stage, extra):
    """PPO + EPO on 2 processes: DDP and ZeRO-2 with gradient accumulation, and ZeRO-3 with one row per turn and 2
    optimizer steps per rollout (the checkpoint falls inside the rollout). The critic (DDP-wrapped, or its own ZeRO-3 engine)
    trains, ends with the same parameters on both processes (ZeRO-3: gathered), logs the same reduced metrics, and is
    restored from the checkpoint with its optimizer and schedule: the resumed run ends with the same critic."""
    output_dir = tmp_path / "run"
    reports = launch(config, output_dir, [*PPO_FLAGS, *extra])
    r0, r1 = reports[0], reports[1]
    assert r0["zero_stage"] == r1["zero_stage"] == zero_stage
    for report in (r0, r1):
        trained = report["trained"]
        assert trained["global_step"] == 2 and len(trained["losses"]) == 2
        assert all(math.isfinite(x) for x in trained["losses"])
        assert trained["rows_trained_once"]
        logs = trained["critic_logs"]
        assert len(logs) == 2 and all(math.isfinite(log["critic/value_loss"]) for log in logs)
        assert all("critic/clipfrac" in log and "critic/grad_norm" in log for log in logs)
    assert r0["trained"]["losses"] == r1["trained"]["losses"]
    assert r0["trained"]["critic_logs"] == r1["trained"]["critic_logs"]
    # The critic: identical on both processes, before and after training, and changed by it.
    assert r0["trained"]["initial_critic"]["digest"] == r1["trained"]["initial_critic"]["digest"]
    assert r0["trained"]["critic"]["digest"] == r1["trained"]["critic"]["digest"]
    assert r0["trained"]["critic"]["digest"] != r0["trained"]["initial_critic"]["digest"]
    trained = tensors(r0["trained"]["critic"]["path"])
    assert all(torch.equal(trained[k], v) for k, v in tensors(r1["trained"]["critic"]["path"]).items())
    # Resumed from checkpoint-1 (critic weights, optimizer and schedule restored): the same losses and critic metrics
    # for step 2, and exactly the same critic at the end.
    for report in (r0, r1):
        resumed = report["resumed"]
        assert resumed["global_step"] == 2
        assert resumed["losses"] == report["trained"]["losses"]
        assert resumed["critic_logs"][1] == report["trained"]["critic_logs"][1]
        assert resumed["critic"]["digest"] == report["trained"]["critic"]["digest"]
    checkpoint = output_dir / "checkpoint-1"
    assert (checkpoint / "critic" / "scheduler.json").exists()
    if zero_stage:
        assert (checkpoint / "critic_engine").is_dir()  # the critic engine's own DeepSpeed checkpoint
        assert (checkpoint / "latest").read_text().strip() == "global_step1"  # the policy engine's, untouched
    else:
        assert (checkpoint / "critic" / "optimizer.pt").exists()
