"""`trl-epo evaluate` shows a trained model the prompts it was trained on: for the output of each training example
(toy, ScienceWorld, ALFWorld), the evaluation's first prompt of a task is byte-identical to the training rollout's
(the env's instruction, its constructor arguments and the observation truncation included)."""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from trl_epo.cli import EvaluateArguments, evaluation_settings, load_model_for_eval
from trl_epo.envs.registry import get_env
from trl_epo.rollout import ModelGenerator, MultiTurnRollout


REPO = Path(__file__).resolve().parents[2]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def first_prompt_as_evaluated(output_dir: str, task) -> tuple[list[int], object]:
    """The first prompt `trl-epo evaluate --model output_dir` renders for `task` (settings from epo_run.json)."""
    settings = evaluation_settings(EvaluateArguments(model=output_dir, pool_backend="inline"))
    model, tokenizer = load_model_for_eval(output_dir, device="cpu")
    config = settings["rollout_config"].replace(max_turns=1, max_turn_tokens=2, progress_bar=False)
    rollout = MultiTurnRollout(get_env(settings["env"]).factory(**settings["env_kwargs"]), config)
    try:
        (episode,) = rollout.play([task], ModelGenerator(model, tokenizer, temperature=0), tokenizer).episodes
    finally:
        rollout.close()
    return episode.prompt_ids, tokenizer


def assert_same_first_prompt(trainer, output_dir: str, instruction_start: str | None = None):
    trained = trainer.env_rollout.last_batch.episodes[0]
    ids, tokenizer = first_prompt_as_evaluated(output_dir, trained.task)
    assert tokenizer.decode(ids) == tokenizer.decode(trained.prompt_ids)
    assert ids == trained.prompt_ids
    if instruction_start is not None:
        assert trained.messages[0]["content"].startswith(instruction_start)


def test_toy_example(tmp_path):
    train_toy = load_example("train_toy")
    out = str(tmp_path / "toy")
    script_args, training_args, model_args = train_toy.make_parser().parse_args_and_config(
        [
            "--model_name_or_path",
            "tiny",
            "--output_dir",
            out,
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--num_generations",
            "2",
            "--max_completion_length",
            "200",
            "--env_max_turns",
            "2",
            "--env_max_turn_tokens",
            "6",
            "--env_pool_backend",
            "inline",
            "--env_max_observation_chars",
            "40",
            "--env_instruction",
            "Act! Answer like {example}.",
            "--use_cpu",
            "true",
            "--bf16",
            "false",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--disable_tqdm",
            "true",
        ]
    )
    trainer = train_toy.build_trainer(script_args, training_args, model_args)
    trainer.train()
    trainer.save_model(out)
    trainer.processing_class.save_pretrained(out)
    assert_same_first_prompt(trainer, out, instruction_start="Act! Answer like <action>")
    assert " [...]" in trainer.env_rollout.last_batch.episodes[0].messages[1]["content"]  # truncated at 40 chars


def test_sciworld_example(tmp_path):
    import helpers.sciworld_required  # noqa: F401  (skips without scienceworld or Java)

    train_sciworld = load_example("train_sciworld")
    out = str(tmp_path / "sciworld")
    trainer = train_sciworld.main(
        [
            "--config",
            str(REPO / "examples" / "configs" / "sciworld_quickstart_tiny.yaml"),
            "--output_dir",
            out,
            "--max_steps",
            "1",
            "--warm_start_steps",
            "0",
            "--num_train_tasks",
            "2",
            "--num_eval_tasks",
            "0",
            "--per_device_train_batch_size",
            "2",
            "--num_generations",
            "2",
            "--env_pool_size",
            "2",
            "--env_pool_backend",
            "process",
            "--show_objects",
            "true",
            "--disable_tqdm",
            "true",
        ]
    )
    assert_same_first_prompt(trainer, out, instruction_start="You are an agent in ScienceWorld")


def test_alfworld_example(tmp_path):
    from helpers.alfworld_testdata import generated_games

    root, _ = generated_games()
    data_root = tmp_path / "games"
    shutil.copytree(root, data_root)
    train_alfworld = load_example("train_alfworld")
    out = str(tmp_path / "alfworld")
    trainer = train_alfworld.main(
        [
            "--config",
            str(REPO / "examples" / "configs" / "alfworld_tiny.yaml"),
            "--output_dir",
            out,
            "--data_root",
            str(data_root),
            "--generate_per_type",
            "0",
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--env_max_turns",
            "2",
            "--env_pool_backend",
            "thread",
        ]
    )
    assert os.path.exists(os.path.join(out, "epo_run.json"))
    assert_same_first_prompt(trainer, out)
