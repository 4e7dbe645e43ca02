"""The critic: what it is made of, and its values for training rows.

Default critic (as the reference does): the policy's own architecture with a scalar value head, i.e. transformers'
`AutoModelForTokenClassification` with one label (the backbone plus a linear `score` head read at every position),
initialised from the policy's weights (a fresh head, no dropout). A LoRA policy gets a LoRA critic: its own base copy
(frozen) with a LoRA adapter of the same configuration and a trainable head. A user-given value model must follow the
same contract: ``model(input_ids=..., attention_mask=..., position_ids=..., use_cache=False).logits`` of shape
``(B, L, 1)``, one value per position (e.g. any `AutoModelForTokenClassification.from_pretrained(path, num_labels=1)`).
"""

from __future__ import annotations

import contextlib
import copy
import glob
import os

import torch
from torch import nn

from ..distributed import whole_model_init
from ..packing import row_model_inputs


VALUE_HEAD = "score"
"""The value head's module name in transformers' token-classification models (PEFT trains it as a whole module)."""


def critic_from_pretrained(path: str, args, quantization_config=None) -> nn.Module:
    """A value model loaded from a checkpoint with the policy's `model_init_kwargs`: the backbone's weights, a fresh
    value head, no dropout (ZeRO-3: loaded sharded)."""
    from transformers import AutoConfig, AutoModelForTokenClassification
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(args.model_init_kwargs or {})
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # distributed training places models itself
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    config = AutoConfig.from_pretrained(
        path, revision=kwargs.get("revision"), trust_remote_code=kwargs["trust_remote_code"], num_labels=1
    )
    config.classifier_dropout = 0.0
    return create_model_from_path(path, architecture=AutoModelForTokenClassification, config=config, **kwargs)


def critic_from_policy(policy: nn.Module, args) -> nn.Module:
    """A value model with the policy's architecture and the policy's current backbone weights (for a policy given as
    a model object, e.g. after a warm start). Built whole (not sharded): DeepSpeed shards it when it is prepared."""
    from transformers import AutoModelForTokenClassification

    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    if getattr(base.config, "quantization_config", None) is not None:
        raise ValueError(
            "The policy is quantized, so the critic cannot copy its weights. Pass the policy as a model path (the "
            "critic is then loaded from it with the same quantization), or `critic_model_name_or_path`."
        )
    config = copy.deepcopy(base.config)
    config.num_labels, config.classifier_dropout = 1, 0.0
    config.architectures = None
    dtype = next(base.parameters()).dtype
    with whole_model_init(args):
        critic = AutoModelForTokenClassification.from_config(
            config, dtype=dtype, attn_implementation=config._attn_implementation
        )
    prefix = critic.base_model_prefix
    backbone = _backbone_state(getattr(base, base.base_model_prefix, base))
    missing, unexpected = getattr(critic, prefix).load_state_dict(backbone, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"The critic could not copy the policy's backbone (missing {missing[:3]}, unexpected {unexpected[:3]}). "
            "Pass `value_model=` (a token-classification model with one label) or `critic_model_name_or_path`."
        )
    return critic


def with_lora(critic: nn.Module, policy_peft_config) -> nn.Module:
    """The critic with a LoRA adapter of the policy's configuration (its base frozen) and a fully trained head."""
    from peft import TaskType, get_peft_model

    config = copy.deepcopy(policy_peft_config)
    config.task_type = TaskType.TOKEN_CLS  # PEFT then trains the `score` head as a whole (modules_to_save) ...
    excluded = getattr(config, "exclude_modules", None)  # ... so no LoRA inside it ("all-linear" would target it)
    if isinstance(excluded, str):
        config.exclude_modules = f"(?:{excluded})|(?:{VALUE_HEAD})"
    else:
        config.exclude_modules = sorted(set(excluded or ()) | {VALUE_HEAD})
    return get_peft_model(critic, config)


def enable_activation_checkpointing(model: nn.Module, args) -> None:
    """Activation (gradient) checkpointing for the critic when the run uses it for the policy, as `Trainer` enables
    it (`activation_checkpointing_kwargs`: `every_n_layers`, `offload`, the rest for `torch.utils.checkpoint`)."""
    if not getattr(args, "activation_checkpointing", args.gradient_checkpointing):
        return
    kwargs = dict(getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {})
    every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
        )
    elif hasattr(model, "gradient_checkpointing_enable"):  # a value model outside transformers' PreTrainedModel
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


def check_value_model(model: nn.Module) -> None:
    """A user-given value model must be a module with one output per position."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"value_model must be a torch module (e.g. AutoModelForTokenClassification with num_labels=1), got "
            f"{type(model).__name__}."
        )
    labels = getattr(getattr(model, "config", None), "num_labels", 1)
    if labels != 1:
        raise ValueError(
            f"value_model has {labels} outputs per position; a critic has one: load it with `num_labels=1`."
        )


def critic_values(critic, inputs: dict[str, torch.Tensor], marker: list[int] | None, autocast) -> torch.Tensor:
    """``(B, C)`` float32 values V(s_t) for each completion position t of a chunk (TRL's loss inputs from
    `trl_epo.rows.collate`): the critic's output at the last position *before* token t, with the same position ids
    the policy is scored with (`trl_epo.packing.row_model_inputs`)."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with autocast():
        output = critic(**row_model_inputs(input_ids, attention_mask, marker), use_cache=False)
    logits = output.logits if hasattr(output, "logits") else output[0]
    shape = tuple(logits.shape)
    if logits.dim() == 3 and logits.size(-1) == 1:
        logits = logits.squeeze(-1)
    if logits.shape != input_ids.shape:
        raise ValueError(
            f"The critic returned values of shape {shape} for inputs of shape {tuple(input_ids.shape)}: it must "
            "return one value per position (a token-classification model with num_labels=1, not a "
            "sequence-classification one)."
        )
    width = inputs["completion_ids"].size(1)
    return logits[:, -width - 1 : -1].float()


def load_critic_weights(model: nn.Module, folder: str) -> None:
    """Load weights saved by `save_pretrained` (a full critic, possibly sharded, or a PEFT critic's adapter and head)
    into `model` (unwrapped), checking that every weight was found."""
    if hasattr(model, "peft_config"):
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_peft_weights(folder))
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise ValueError(f"The saved critic adapter in {folder} does not fit the critic: {unexpected[:3]}.")
        return
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"No critic weights (*.safetensors) in {folder}.")
    state = {}
    for path in files:
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"The critic in {folder} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}.")


def _backbone_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights as plain tensors: gathered when DeepSpeed ZeRO-3 shards them, without PEFT's LoRA
    layers (the critic starts from the base weights; a fresh LoRA adapter is the identity)."""
    params = list(backbone.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        state = {}
        for key, value in backbone.state_dict().items():
            if "lora_" in key or ".modules_to_save." in key:
                continue
            state[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value.detach().clone()
    return state
