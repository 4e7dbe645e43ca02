"""EPO with PEFT: LoRA (with gradient checkpointing and a KL term whose reference is the adapter-disabled policy) and
QLoRA (a real bitsandbytes 4-bit base + LoRA, on CPU), built through `examples/train_toy.py` with TRL's `ModelConfig`
flags (`--use_peft`, `--lora_r`, `--load_in_4bit`) on the toy multi-turn env. Two EPO steps each; only the adapter
changes; the saved adapter reloads into the same policy; merging works for LoRA and is refused for a 4-bit base."""

import copy
import math
import os
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "examples"))

from train_toy import build_trainer, make_parser  # noqa: E402


COMMON = [
    "--model_name_or_path",
    "tiny",
    "--bf16",
    "false",
    "--use_cpu",
    "true",
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
    "4",
    "--learning_rate",
    "5e-2",
    "--logging_steps",
    "1",
    "--save_strategy",
    "no",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--use_peft",
    "--lora_r",
    "4",
    "--lora_alpha",
    "8",
    "--lora_target_modules",
    "all-linear",
    "--beta",
    "0.04",  # a KL term: its reference must be the policy with the adapter disabled
]


def make_trainer(tmp_path, *flags):
    script_args, training_args, model_args = make_parser().parse_args_and_config(
        args=[*COMMON, "--output_dir", str(tmp_path / "run"), *flags]
    )
    return build_trainer(script_args, training_args, model_args)


def snapshot(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def train_and_check(trainer):
    model = trainer.model
    assert isinstance(model, PeftModel)
    assert trainer.ref_model is None  # TRL computes the reference with the adapter disabled
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    before = snapshot(model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) for log in logs)
    for log in logs:
        for key in ("epo/entropy", "epo/beta", "kl", "rollout/mean_turns"):
            assert key in log and math.isfinite(log[key]), key
    assert logs[1]["kl"] > 0  # the adapter moved the policy away from the (adapter-disabled) reference
    assert trainer.epo_reference.num_updates == 2
    after = snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "training changed nothing"
    assert changed <= trainable, f"frozen weights changed: {sorted(changed - trainable)[:5]}"
    assert any(".lora_B." in name for name in changed)
    return trainer


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def probe_ids(trainer):
    tokenizer = trainer.processing_class
    return torch.tensor([tokenizer("Find the key, take it and open the door. <action>go east</action>")["input_ids"]])


def base_dir(trainer):
    return os.path.join(trainer.args.output_dir, "_tiny_base")


def check_saved_adapter(folder):
    names = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer_config.json"} <= names
    assert "model.safetensors" not in names  # the adapter alone
    assert "## EPO training" in open(os.path.join(folder, "README.md")).read()


def test_lora_trains_only_the_adapter_and_the_saved_adapter_reloads(tmp_path):
    trainer = train_and_check(make_trainer(tmp_path, "--gradient_checkpointing", "true"))
    model, ids = trainer.model, probe_ids(trainer)
    base = AutoModelForCausalLM.from_pretrained(base_dir(trainer), dtype=torch.float32)

    # The KL reference (adapter disabled) is exactly the base model; the trained policy is not.
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), logits(base, ids))
    trained = logits(model, ids)
    assert not torch.allclose(trained, logits(base, ids))

    # The adapter alone reloads into the same policy.
    adapter_dir = tmp_path / "adapter"
    trainer.save_adapter(str(adapter_dir))
    check_saved_adapter(adapter_dir)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir)
    torch.testing.assert_close(logits(reloaded, ids), trained)

    # The merged model is PEFT's merge_and_unload, as a plain model; the training model keeps its separate adapter.
    merged_dir = tmp_path / "merged"
    trainer.save_merged_model(str(merged_dir))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(merged.state_dict()) == set(expected)
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(logits(merged, ids), trained, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), trained)  # unmerged again, unchanged
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_qlora_4bit_trains_only_the_adapter_and_the_saved_adapter_reloads(tmp_path):
    trainer = make_trainer(tmp_path, "--load_in_4bit", "--bnb_4bit_quant_type", "nf4")
    model = trainer.model
    assert model.get_base_model().is_loaded_in_4bit
    quantized = [name for name, p in model.named_parameters() if type(p).__name__ == "Params4bit"]
    assert quantized, "the base model is not a bitsandbytes 4-bit model"
    train_and_check(trainer)
    ids = probe_ids(trainer)
    trained = logits(model, ids)

    adapter_dir = tmp_path / "adapter"
    trainer.save_adapter(str(adapter_dir))
    check_saved_adapter(adapter_dir)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base4 = AutoModelForCausalLM.from_pretrained(
        base_dir(trainer), quantization_config=quantization, dtype=torch.float32
    )
    reloaded = PeftModel.from_pretrained(base4, adapter_dir)
    for name, param in reloaded.named_parameters():  # TRL trains QLoRA adapters in bf16 (the file holds bf16)
        if ".lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    trained_adapter = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    reloaded_adapter = {k: v for k, v in reloaded.state_dict().items() if ".lora_" in k}
    assert trained_adapter.keys() == reloaded_adapter.keys()
    for key in trained_adapter:
        assert trained_adapter[key].dtype == reloaded_adapter[key].dtype == torch.bfloat16, key
        assert torch.equal(trained_adapter[key], reloaded_adapter[key]), key
    torch.testing.assert_close(logits(reloaded, ids), trained)

    # Never merge into the 4-bit base ...
    with pytest.raises(ValueError, match="4-bit.*save_adapter.*merge_adapter_checkpoint"):
        trainer.save_merged_model(str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()
    # ... but into a full-precision copy of it, offline: W + scaling * B @ A on every adapted layer.
    from trl_epo.saving import merge_adapter_checkpoint

    merged_dir = merge_adapter_checkpoint(str(adapter_dir), str(tmp_path / "merged-fp32"), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(base_dir(trainer), dtype=torch.float32).state_dict()
    scaling = 8 / 4  # lora_alpha / r
    checked = 0
    for key, a in trained_adapter.items():
        if ".lora_A." not in key:
            continue
        b = trained_adapter[key.replace(".lora_A.", ".lora_B.")]
        weight = key.split("base_model.model.", 1)[1].replace(".lora_A.default.weight", ".weight")
        delta = scaling * (b.float() @ a.float())
        torch.testing.assert_close(merged[weight], base[weight] + delta, rtol=1e-5, atol=1e-6, msg=weight)
        checked += 1
    assert checked == 14  # 7 linear layers x 2 decoder layers
    assert "merged into a float32 copy" in open(os.path.join(merged_dir, "README.md")).read()
