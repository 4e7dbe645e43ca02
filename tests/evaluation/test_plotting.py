"""Plots from a real short multi-turn training run: files produced and non-empty, the newest checkpoint used when
the final state is missing, the CLI entry point, and the log-history helpers on hand-made histories."""

import json
import math
import os
import shutil

import pytest
import torch
from conftest import base_config_kwargs

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.cli import main as cli_main
from trl_epo.envs.toy import ToyEnv, make_dataset
from trl_epo.plotting import find_trainer_state, load_log_history, plot_run, rolling_mean, series, turn_entropy_matrix
from trl_epo.tiny import build_tiny_model


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    output_dir = tmp_path_factory.mktemp("run")
    args = EPOConfig(
        **base_config_kwargs(
            output_dir,
            max_steps=4,
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=160,
            env_max_turns=3,
            env_max_turn_tokens=10,
            env_pool_backend="thread",
            save_strategy="steps",
            save_steps=2,
            epo_kappa_low=0.5,
            epo_kappa_high=1.5,
            env_log_episodes=False,
        )
    )
    trainer = EPOTrainer(
        build_tiny_model(tokenizer),
        args=args,
        train_dataset=make_dataset("train", 8),
        processing_class=tokenizer,
        env_factory=ToyEnv,
    )
    trainer.train()
    torch.set_num_threads(threads)
    return output_dir


def assert_png(path):
    assert os.path.getsize(path) > 10_000
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_plot_run_writes_the_figures(run_dir, tmp_path):
    written = plot_run(str(run_dir), out_dir=str(tmp_path / "plots"))
    assert set(written) == {"epo_dynamics", "entropy_turn_heatmap"}
    for path in written.values():
        assert_png(path)
    history, source = load_log_history(str(run_dir))
    assert source == str(run_dir / "trainer_state.json") and len(history) == 4
    steps, reference = series(history, "epo/reference")
    assert steps == [2, 3, 4] and all(r > 0 for r in reference)
    turns, steps, matrix = turn_entropy_matrix(history)
    assert turns == [0, 1, 2] and steps == [1, 2, 3, 4] and not any(math.isnan(v) for row in matrix for v in row)


def test_newest_checkpoint_is_used_without_final_state(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    os.remove(copy / "trainer_state.json")
    assert find_trainer_state(str(copy)) == str(copy / "checkpoint-4" / "trainer_state.json")
    written = plot_run(str(copy))
    assert all(os.path.dirname(p) == str(copy / "plots") for p in written.values())
    # A checkpoint folder works too; the kappas come from the parent's epo_run.json.
    written = plot_run(str(copy / "checkpoint-2"), out_dir=str(tmp_path / "ck2"))
    assert_png(written["epo_dynamics"])


def test_cli_plot(run_dir, tmp_path, capsys):
    assert cli_main(["plot", str(run_dir), "--out", str(tmp_path / "cli")]) == 0
    assert "epo_dynamics" in capsys.readouterr().out
    assert_png(tmp_path / "cli" / "epo_dynamics.png")
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        cli_main(["plot", str(tmp_path / "nothing")])


def test_history_helpers_on_hand_made_logs(tmp_path):
    history = [
        {"step": 2, "epo/entropy": 1.0, "epo/entropy_turn/0": 1.0},
        {"step": 1, "epo/entropy": 2.0, "epo/entropy_turn/0": 2.0, "epo/entropy_turn/3": 5.0},
        {"step": 3, "loss": 0.1},
    ]
    assert series(history, "epo/entropy") == ([1, 2], [2.0, 1.0])
    turns, steps, matrix = turn_entropy_matrix(history)
    assert turns == [0, 3] and steps == [1, 2]
    assert matrix[0] == [2.0, 1.0] and matrix[1][0] == 5.0 and math.isnan(matrix[1][1])
    assert rolling_mean([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    # A GRPO-like history without EPO metrics still plots (panels say "not logged").
    (tmp_path / "trainer_state.json").write_text(
        json.dumps({"global_step": 2, "log_history": [{"step": 1, "reward": 0.0}, {"step": 2, "reward": 0.5}]})
    )
    written = plot_run(str(tmp_path))
    assert set(written) == {"epo_dynamics"}
