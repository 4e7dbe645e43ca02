"""examples/sft_alfworld.py runs offline: generated games -> expert SFT data -> a tiny model trained and saved."""

import importlib.util
import os
import sys

from helpers.alfworld_testdata import REPO_ROOT


def _load_example():
    spec = importlib.util.spec_from_file_location("sft_alfworld", REPO_ROOT / "examples" / "sft_alfworld.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_sft_example_trains_a_tiny_model_offline(generated_root, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    example = _load_example()
    out = tmp_path / "sft"
    trainer = example.main(
        [
            "--tiny",
            "true",
            "--data_root",
            generated_root,
            "--task_types",
            "look_at_obj_in_light",
            "pick_and_place_simple",
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--learning_rate",
            "1e-3",
            "--max_length",
            "2048",
            "--report_to",
            "none",
            "--use_cpu",
            "true",
            "--bf16",
            "false",
            "--save_strategy",
            "no",
            "--logging_steps",
            "1",
            "--disable_tqdm",
            "true",
        ]
    )
    assert trainer.state.global_step == 2
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert os.path.isfile(out / "config.json") and os.path.isfile(out / "tokenizer.json")
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size >= len(tokenizer)
    # Only the answers are trained on: the collated labels mask the prompt.
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels = batch["labels"][0]
    answer = tokenizer.decode(labels[labels != -100])
    assert answer.startswith("<action>") and "</action>" in answer
