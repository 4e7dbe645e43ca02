"""Evaluation: Wilson intervals on known counts, the scripted toy solver through the real generate path, task
selection, the eval_results.json file and the command line (full model, checkpoint and LoRA adapter directories)."""

import json
import math

import pytest
from helpers.policies import garbage_policy, toy_solver
from helpers.scripted import ScriptedLM

from trl_epo.cli import evaluate_main as main
from trl_epo.cli import load_model_for_eval
from trl_epo.evaluation import evaluate, split_tasks
from trl_epo.results import load_eval_results as read_eval_results
from trl_epo.results import save_eval_results, wilson_interval
from trl_epo.rollout import RolloutConfig
from trl_epo.run_files import EVAL_RESULTS_NAME


def test_wilson_interval_on_known_counts():
    z = 1.959963984540054
    # Closed forms at the edges: 0/n -> (0, z^2/(n+z^2)), n/n -> (n/(n+z^2), 1).
    assert wilson_interval(0, 10) == pytest.approx((0.0, z * z / (10 + z * z)))
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z * z), 1.0))
    # Textbook values (e.g. Newcombe 1998): 5/10 -> 0.2366-0.7634, 81/263 -> 0.2553-0.3662.
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low90, high90 = wilson_interval(5, 10, confidence=0.90)
    assert 0.2366 < low90 and high90 < 0.7634
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_scripted_solver_scores_one_with_the_right_interval(tokenizer):
    model = ScriptedLM(tokenizer, toy_solver)
    result = evaluate(
        model,
        tokenizer,
        env="toy",
        split="iid",
        num_episodes=5,
        seed=[0, 1],
        max_turn_tokens=40,
        pool_backend="thread",
        batch_size=3,
        progress_bar=False,
    )
    assert result["num_episodes"] == 10 and result["num_tasks"] == 5 and result["seeds"] == [0, 1]
    assert result["success_rate"] == 1.0 and result["successes"] == 10
    assert result["success_ci"] == pytest.approx(list(wilson_interval(10, 10)))
    assert result["ci_method"] == "wilson" and result["confidence"] == 0.95
    assert result["invalid_turn_rate"] == 0.0 and result["env_error_episodes"] == 0
    assert result["settings"]["temperature"] == 0.4 and result["settings"]["max_turns"] == 15
    assert [s["episodes"] for s in result["per_seed"]] == [5, 5]
    assert sum(t["episodes"] for t in result["per_task"].values()) == 10
    assert len(result["episodes"]) == 10 and all(e["won"] for e in result["episodes"])
    assert result["mean_turns"] == pytest.approx(sum(e["turns"] for e in result["episodes"]) / 10)
    assert result["mean_turns"] >= 3  # the shortest toy solution: take, go east, open door
    json.dumps(result)  # JSON-serialisable


def test_invalid_answers_and_turn_limit(tokenizer):
    model = ScriptedLM(tokenizer, garbage_policy)
    result = evaluate(
        model,
        tokenizer,
        env="toy",
        split="ood",
        num_episodes=3,
        max_turns=2,
        max_turn_tokens=40,
        pool_backend="inline",
        progress_bar=False,
    )
    assert result["success_rate"] == 0.0 and result["invalid_turn_rate"] == 1.0
    assert result["mean_turns"] == 2 and result["truncation_rate"] == 1.0
    assert result["success_ci"][0] == 0.0 and result["success_ci"][1] == pytest.approx(wilson_interval(0, 3)[1])
    assert result["mean_turns_success"] is None


def test_split_task_selection():
    tasks, info = split_tasks("toy", "iid", None)
    assert info["selection"] == "all" and len(tasks) == info["split_size"] == 16  # the toy module's default split
    tasks, info = split_tasks("toy", "ood", 40)
    assert len(tasks) == 40 and info["selection"] == "all"  # generated splits are asked for exactly N tasks
    full, _ = split_tasks("toy", "iid", None, {"num_tasks": 10})
    subset, info = split_tasks("toy", "iid", 4, {"num_tasks": 10})
    assert info["selection"] == "random_subset" and len(subset) == 4 and all(t in full for t in subset)
    assert subset == split_tasks("toy", "iid", 4, {"num_tasks": 10})[0]  # deterministic
    cycled, info = split_tasks("toy", "iid", 25, {"num_tasks": 10})
    assert info["selection"] == "cycled" and cycled[:10] == full and cycled[10:20] == full
    with pytest.raises(ValueError, match="split"):
        split_tasks("toy", "heldout", None)


def test_eval_results_file_merges_per_split_and_feeds_the_model_card(tmp_path):
    def fake(split, rate):
        return {
            "env": "toy",
            "split": split,
            "success_rate": rate,
            "num_episodes": 4,
            "success_ci": [0.1, 0.9],
            "seeds": [0],
            "mean_turns": 3.5,
            "invalid_turn_rate": 0.25,
            "model": "m",
            "settings": {"temperature": 0.4},
            "episodes": [{"won": True}],
        }

    path = save_eval_results(fake("iid", 0.5), str(tmp_path))
    assert path == str(tmp_path / EVAL_RESULTS_NAME)
    save_eval_results(fake("ood", 0.1), path)
    save_eval_results(fake("iid", 0.75), path)  # replaces the older iid result
    results = read_eval_results(path)
    assert [(r.split, r.success_rate) for r in results] == [("iid", 0.75), ("ood", 0.1)]
    iid = results[0]
    assert (iid.episodes, iid.ci_low, iid.ci_high, iid.temperature, iid.mean_turns) == (4, 0.1, 0.9, 0.4, 3.5)
    assert iid.extra["invalid_turn_rate"] == 0.25 and "episodes" not in iid.extra
    assert (tmp_path / "eval_episodes_toy_iid.jsonl").read_text().strip() == '{"won": true}'
    # The model card reads the same file (a folder or the file itself).
    assert read_eval_results(str(tmp_path)) == results
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="evaluation results"):
        read_eval_results(str(tmp_path / "other.json"))


def test_command_line_on_saved_checkpoint_and_lora_adapter(tokenizer, make_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "run"
    checkpoint = run / "checkpoint-3"
    model = make_model()
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(run)  # a checkpoint without tokenizer files: found in the parent output_dir
    recorded = RolloutConfig(max_turns=2, max_turn_tokens=6).to_dict()
    (run / "epo_run.json").write_text(json.dumps({"rollout": {"env": "toy", "env_kwargs": {}, "config": recorded}}))
    results = main(
        [
            "--model",
            str(checkpoint),
            "--env",
            "toy",
            "--split",
            "iid",
            "ood",
            "--num_episodes",
            "3",
            "--pool_backend",
            "thread",
            "--seeds",
            "0",
            "1",
        ]
    )
    saved = read_eval_results(str(checkpoint / EVAL_RESULTS_NAME))
    assert [r.split for r in saved] == ["iid", "ood"]
    for r in saved:
        assert r.episodes == 6 and r.seeds == [0, 1] and r.model == str(checkpoint)
        settings = r.extra["settings"]
        assert settings["max_turns"] == 2 and settings["max_turn_tokens"] == 6  # the training run's
        assert 0 <= r.ci_low <= r.success_rate <= r.ci_high <= 1
        assert not math.isnan(r.mean_turns)
    assert len(results) == 2

    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(make_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(adapter)
    loaded, loaded_tokenizer = load_model_for_eval(str(adapter), device="cpu")
    assert type(loaded).__name__.startswith("Peft") and loaded_tokenizer.chat_template
    result = evaluate(
        loaded,
        loaded_tokenizer,
        "toy",
        "iid",
        num_episodes=2,
        max_turns=1,
        max_turn_tokens=4,
        pool_backend="inline",
        progress_bar=False,
    )
    assert result["num_episodes"] == 2
