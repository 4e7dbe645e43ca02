"""Saving a LoRA-trained policy: the base model with the adapter merged in (without altering the training model),
and merging a saved adapter into a full-precision copy of its base (the way to a merged model after QLoRA).

The trainer's `save_adapter` / `save_merged_model` call these; nothing here calls back into a trainer.
"""

from __future__ import annotations

import os

from .card import quantization_summary


MERGED_CONTENTS = "the base model with the adapter merged into it (a plain model)."


ADAPTER_CONTENTS = "the PEFT adapter alone (load it on the base model)."
QUANTIZED_MERGE_ERROR = (
    "The policy's base model is quantized ({quantization}): merging the adapter into it would round the merged "
    "weights back to the quantized format and lose the adapter's update, so trl_epo never merges into a quantized "
    "base. Save the adapter instead (`trainer.save_adapter(dir)`) and either serve it on the quantized base, or merge "
    "it into a full-precision copy of the base model with `trl_epo.saving.merge_adapter_checkpoint(adapter_dir, "
    "output_dir, dtype='bfloat16')` (note that the adapter was trained against the quantized weights)."
)


def require_peft(model, what: str):
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ValueError(
            f"{what} needs a PEFT (LoRA) model, but this run fine-tunes the full model ({type(model).__name__}). "
            "Use `trainer.save_model(dir)` to save it, or train with a `peft_config` (`--use_peft`)."
        )
    return model


def merged_state_dict(model) -> dict:
    """The state dict of `model`'s base model with its active adapter merged in, named like the plain base model.

    `model` must be a PeftModel whose adapter is currently merged (`merge_adapter()`): adapter weights are dropped,
    `base_layer.` is removed from wrapped layers' names and `modules_to_save` copies replace their originals, which is
    what PEFT's `merge_and_unload()` produces, without unloading the adapter from the training model."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    active = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    adapter_keys: set[str] = set()
    renames: list[tuple[str, str]] = []
    for name, module in base.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, ModulesToSaveWrapper):
            adapter_keys.update(f"{prefix}{k}" for k in module.original_module.state_dict())
            for adapter_name, copy in module.modules_to_save.items():
                keys = [f"{prefix}modules_to_save.{adapter_name}.{k}" for k in copy.state_dict()]
                if adapter_name == active:
                    renames += [(key, f"{prefix}{k}") for key, k in zip(keys, copy.state_dict())]
                else:
                    adapter_keys.update(keys)
            adapter_keys.update(f"{prefix}original_module.{k}" for k in module.original_module.state_dict())
        elif isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                layer = getattr(module, layer_name, None)
                if layer is None:
                    continue
                adapter_keys.update(f"{prefix}{layer_name}.{k}" for k in layer.state_dict())
    rename = dict(renames)
    out = {}
    for key, tensor in base.state_dict().items():
        if key in rename:
            out[rename[key]] = tensor.detach().to("cpu", copy=True)
            continue
        if key in adapter_keys:
            continue
        out[key.replace(".base_layer.", ".")] = tensor.detach().to("cpu", copy=True)
    return out


def save_merged_model(model, output_dir: str, gather_params, is_main: bool, processing_class=None, **save_kwargs):
    """Save `model`'s base with its adapter merged in (a plain transformers model), leaving `model` as it was: the
    adapter is merged in place with PEFT's `merge_adapter()`, the merged weights are copied, `unmerge_adapter()`
    restores it. `gather_params(params)` makes full weights available (ZeRO-3); call it on every process. Refuses a
    quantized (4-bit/8-bit) base model."""
    model = require_peft(model, "save_merged_model")
    quantization = quantization_summary(model)
    if quantization is not None:
        raise ValueError(QUANTIZED_MERGE_ERROR.format(quantization=quantization))
    state_dict = None
    with gather_params(list(model.parameters())):
        if is_main:
            model.merge_adapter()
            try:
                state_dict = merged_state_dict(model)
            finally:
                model.unmerge_adapter()
    if is_main:
        model.get_base_model().save_pretrained(output_dir, state_dict=state_dict, **save_kwargs)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
    return output_dir


def merge_adapter_checkpoint(
    adapter_dir: str, output_dir: str, base_model: str | None = None, dtype: str = "bfloat16", **from_pretrained_kwargs
) -> str:
    """Merge a saved adapter into a full-precision copy of its base model and save the result (offline, one
    process). This is the way to get a merged model from a QLoRA run: the base is reloaded *unquantized*.

    Args:
        adapter_dir: a folder written by `save_adapter` / `save_model` (adapter_config.json + weights).
        output_dir: where to write the merged model (+ tokenizer when the adapter folder has one).
        base_model: the base model id/path; default: the adapter config's `base_model_name_or_path`.
        dtype: dtype to load the base model in ("bfloat16", "float16", "float32" or "auto").
    """
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = PeftConfig.from_pretrained(adapter_dir)
    base_model = base_model or config.base_model_name_or_path
    if not base_model:
        raise ValueError(f"{adapter_dir} does not name its base model: pass `base_model=`.")
    if "quantization_config" in from_pretrained_kwargs:
        raise ValueError("merge_adapter_checkpoint loads the base model unquantized; do not pass quantization_config.")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch_dtype, **from_pretrained_kwargs)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    if os.path.exists(os.path.join(adapter_dir, "tokenizer_config.json")):
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(output_dir)
    card = os.path.join(adapter_dir, "README.md")
    if os.path.exists(card):
        with open(card) as f:
            text = f.read()
        with open(os.path.join(output_dir, "README.md"), "w") as f:
            f.write(
                text.replace(
                    f"**Contents of this folder:** {ADAPTER_CONTENTS}",
                    f"**Contents of this folder:** the adapter merged into a {dtype} copy of the base model.",
                )
            )
    return output_dir
