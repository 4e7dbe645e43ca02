"""The benchmark scripts in their seconds-long `--tiny` settings (so they cannot rot), plus the pieces of the
GRPO-vs-EPO comparison that its conclusions rest on: the SFT data is exactly the rollout's chat format, and the
entropy-smoothness statistic is computed right."""

import importlib.util
import json
import math
import os
import statistics
import sys

import pytest
import torch
from helpers.scripted import ScriptedLM

from trl_epo.envs.prompting import PromptStyle
from trl_epo.envs.toy import ToyEnv, expert_actions, make_tasks
from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_benchmark(name):
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_loss_tiny(tmp_path):
    bench = load_benchmark("bench_loss")
    result = bench.main(["--tiny", "--output", str(tmp_path / "loss.json")])
    assert json.loads((tmp_path / "loss.json").read_text())["time_ratio"] == result["time_ratio"]
    assert 0.2 < result["time_ratio"] < 5 and len(result["time_ratio_paired_iqr"]) == 2
    assert set(result["arms"]) == {"grpo", "epo", "epo_off", "trl_entropy"}
    for arm in result["arms"].values():
        assert arm["peak_bytes"] > 0 and arm["time_s"]["median"] > 0
    assert result["arms"]["grpo"]["time_ratio"] == 1.0
    assert 0.5 < result["memory_ratio"] < 2
    assert 0.0 <= result["out_of_corridor_frac"] <= 1.0  # the corridor branch ran
    assert "time ratio vs GRPO" in bench.report(result)


def test_bench_layout_tiny(tmp_path):
    bench = load_benchmark("bench_layout")
    result = bench.main(["--tiny", "--output", str(tmp_path / "layout.json")])
    toy = json.loads((tmp_path / "layout.json").read_text())["sources"]["toy"]
    assert toy["step"]["tokens"] == toy["packed"]["tokens"]  # the same tokens, laid out differently
    assert toy["step"]["rows"] == sum(toy["turns"]) and toy["packed"]["rows"] == toy["episodes"]
    assert toy["step"]["attention_flops"] < toy["packed"]["attention_flops"]
    assert toy["step"]["padding_fraction"] < 0.1
    measured = toy["measured"]
    assert 0 < measured["step_peak_bytes_one_turn_per_forward"] < measured["packed_peak_bytes"]
    projection = result["projection"]["Qwen2.5-7B / ScienceWorld"]
    assert projection["packed"]["dense_mask_bytes"] == 76800**2  # 5.5 GiB: the number
    assert projection["attention_flops_ratio_packed_over_step"] == pytest.approx(30.0)


def test_bench_loss_peak_memory_counts_allocations():
    bench = load_benchmark("bench_loss")

    class Probe:
        def compute_loss(self, model, batch):
            big = torch.ones(1 << 20, requires_grad=True)  # 4 MiB, alive during the call
            return (big * 2).sum()

    class Model:
        def zero_grad(self, set_to_none=True):
            pass

    peak = bench.peak_memory(Probe(), Model(), {}, "cpu")
    assert 8 << 20 <= peak < 20 << 20  # `big` and `big * 2` alive together, and the gradient later


def test_bench_rollout_tiny(tmp_path):
    bench = load_benchmark("bench_rollout")
    result = bench.main(["--tiny", "--output", str(tmp_path / "rollout.json")])
    rows = result["rows"]
    assert {(r["policy"], r["backend"], r["pool_size"]) for r in rows} == {
        (p, b, n) for p in ("model", "random_valid") for b, n in (("process", 1), ("process", 3), ("inline", 3))
    }
    for r in rows:
        assert r["episodes"] == 3 and r["episodes_per_s"] > 0
        assert r["share_generate"] + r["share_env"] + r["share_other"] == pytest.approx(1.0, abs=1e-6)
        if r["policy"] == "random_valid":  # every answer is a valid admissible action: the env is stepped each turn
            assert r["invalid_turn_rate"] == 0.0 and r["env_steps"] == r["turns"] > 0
    assert "episodes/s" in bench.report(result)


def test_compare_tiny(tmp_path):
    compare = load_benchmark("compare_grpo_epo")
    result = compare.main(["--tiny", "--output_dir", str(tmp_path)])
    assert set(result["summary"]) == {"grpo", "epo"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["table"] == result["table"] and len(saved["runs"]) == 2
    assert os.path.getsize(tmp_path / "compare.png") > 10_000
    for run in saved["runs"]:
        folder = tmp_path / "runs" / f"{run['method']}_seed0"
        assert (folder / "trainer_state.json").exists() and (folder / "plots" / "epo_dynamics.png").exists()
        results = json.loads((folder / "eval_results.json").read_text())["results"]
        assert sorted(r["split"] for r in results) == ["iid", "ood"]
        assert len(run["steps"]) == 2 and len(run["entropy"]) == 2
    # The GRPO arm really is GRPO (no EPO term), the EPO arm really has it.
    assert "open-door IID" in saved["per_task_table"] and saved["machine"]["cpu_seconds"] > 0
    again = compare.main(["--resummarize", "--output_dir", str(tmp_path)])  # tables and figure from the files
    assert again["table"] == result["table"] and again["per_task_table"] == saved["per_task_table"]
    grpo_run = json.loads((tmp_path / "runs" / "grpo_seed0" / "epo_run.json").read_text())
    epo_run = json.loads((tmp_path / "runs" / "epo_seed0" / "epo_run.json").read_text())
    assert grpo_run["epo"]["epo_entropy_coef"] == 0.0 and epo_run["epo"]["epo_entropy_coef"] > 0


@pytest.mark.parametrize("show_actions", [True, False])
def test_expert_sft_data_is_the_rollout_format(tokenizer, show_actions):
    compare = load_benchmark("compare_grpo_epo")
    style = PromptStyle(show_admissible_actions=show_actions)
    for task in make_tasks("ood", 1) + make_tasks("train", 1):
        expert = compare.expert_conversation(task, style)
        plan = expert_actions(task)

        def replay(conversation):  # the expert, as a scripted LM: the k-th answer is the k-th expert action
            turn = conversation.count("<|im_start|>assistant") - 1
            return f"<action>{plan[turn]}</action>"

        rollout = MultiTurnRollout(
            ToyEnv,
            RolloutConfig(
                max_turns=20,
                max_turn_tokens=40,
                max_episode_tokens=8000,
                pool_backend="inline",
                progress_bar=False,
                prompt_style=style,
            ),
        )
        (episode,) = rollout.play([task], ModelGenerator(ScriptedLM(tokenizer, replay), tokenizer), tokenizer).episodes
        assert episode.won and episode.messages == expert
        rows = compare.sft_rows([expert])
        assert len(rows["prompt"]) == len(plan) and rows["completion"][0] == [expert[2]]
        # The rendered SFT text of the last row is the rollout's token sequence, decoded.
        text = tokenizer.apply_chat_template(rows["prompt"][-1] + rows["completion"][-1], tokenize=False)
        assert text == tokenizer.decode(episode.prompt_ids + episode.completion_ids) + "\n"


def test_entropy_change_variance():
    compare = load_benchmark("compare_grpo_epo")
    entropy = [1.0, 1.5, 1.2, 1.2, 2.0]
    deltas = [0.5, -0.3, 0.0, 0.8]
    assert compare.entropy_change_variance(entropy) == pytest.approx(statistics.pvariance(deltas))
    assert compare.entropy_change_variance([1.0, float("nan"), 1.0, 1.0]) == 0.0  # NaNs (no log) are skipped
    assert math.isnan(compare.entropy_change_variance([1.0, 2.0]))


@pytest.mark.slow
def test_bench_trl_tools_tiny():
    """Our loop through the TRL-environment adapter, steered to call tools: one row per turn, several turns."""
    bench = load_benchmark("bench_trl_tools")
    result = bench.main(["--tiny", "--arms", "epo_own_loop"])
    (row,) = result["rows"]
    assert row["optimizer_steps"] == 1 and row["episodes"] == 4 and row["episodes_per_s"] > 0
    assert row["rows_per_episode"] > 1 and row["rows"] == round(row["mean_turns_or_tool_calls"] * 4)
    assert "episodes/s" in bench.report(result)
