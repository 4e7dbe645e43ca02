"""Packed rows: several windowed prompts (one per turn) and their answers in one training row.

Positions restart at every block marker (the ids every windowed prompt starts with) and, with position ids and no 2D
attention mask, transformers keeps the packed blocks apart (each block attends only to itself), so every answer is
scored on exactly the context it was generated from.

Two kernels break that, and are guarded here. Flash-attention kernels split a packed row by its position ids only when
the batch has ONE row (transformers' `_is_packed_sequence`): with more rows every block would attend to the earlier
blocks and the padding, so packed rows go through them one per forward. Without flash attention, transformers builds a
dense B x 1 x L x L mask for position-id-packed rows: above a stated size the forward is refused with the fix.
"""

from __future__ import annotations

import torch


MASK_BYTES = {"sdpa": 1, "eager": 4}  # the mask's element size: sdpa's is boolean, eager's an additive float mask


def attention_kernel(model) -> str:
    """The attention implementation the model's forward dispatches on (e.g. 'sdpa', 'flash_attention_2')."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "module"):
        config = getattr(model.module, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def packed_rows_one_per_forward(model) -> bool:
    """Flash-attention-family kernels keep packed blocks apart only for a batch of one row."""
    return "flash" in attention_kernel(model)


def check_packed_forward(model, inputs: dict, limit_gb: float) -> None:
    """Refuse a packed forward the kernel would get wrong (flash attention with > 1 row) or whose dense attention
    mask would exceed `limit_gb` GiB."""
    batch = inputs["prompt_ids"].size(0)
    length = inputs["prompt_ids"].size(1) + inputs["completion_ids"].size(1)
    kernel = attention_kernel(model)
    if packed_rows_one_per_forward(model):
        if batch > 1:
            raise ValueError(
                f"{batch} packed rows in one {kernel} forward: flash attention keeps packed blocks apart only for a "
                "single row, so every block would attend to the earlier ones. Packed rows must go one per forward "
                "(EPOTrainer does this itself; this guards other callers)."
            )
        return
    gib = batch * length * length * MASK_BYTES.get(kernel, 4) / 2**30
    if gib > limit_gb:
        raise ValueError(
            f"A packed forward of {batch} row(s) x {length} tokens under {kernel!r} attention needs a dense "
            f"{batch} x {length} x {length} attention mask of {gib:.1f} GiB (limit env_packed_mask_limit_gb="
            f"{limit_gb}) and {length}^2 attention work per row. Train windowed episodes one row per turn "
            "(env_sample_layout='step', the default), lower env_forward_token_budget, or use a flash-attention kernel "
            "(attn_implementation='flash_attention_2', packed rows then go one per forward)."
        )


def block_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, marker: list[int]) -> torch.Tensor:
    """Position ids that restart at 0 at the first real token of each row and at every occurrence of `marker` (the
    header every packed block starts with). Left padding forms its own block; positions after the last real token
    simply continue (causal attention keeps them from affecting real tokens)."""
    batch, length = input_ids.shape
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    first_real = attention_mask.long().argmax(dim=1)
    starts[torch.arange(batch, device=input_ids.device), first_real] = True
    m = len(marker)
    if 0 < m <= length:
        pattern = torch.as_tensor(marker, device=input_ids.device, dtype=input_ids.dtype)
        hits = (input_ids.unfold(1, m, 1) == pattern).all(-1) & attention_mask[:, : length - m + 1].bool()
        starts[:, : length - m + 1] |= hits
    index = torch.arange(length, device=input_ids.device).expand(batch, -1)
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - last_start


def row_model_inputs(input_ids, attention_mask, marker: list[int] | None) -> dict[str, torch.Tensor]:
    """A model's inputs for training rows, with the positions generation used: packed rows (a block `marker`) restart
    them at every block and go without a 2D mask (transformers keeps the blocks apart from the positions); plain rows
    count them from their first real token (`generate` derives them from the attention mask the same way), so a
    left-padded row is scored exactly as it was sampled, whatever the padding."""
    if marker is not None:
        return {"input_ids": input_ids, "position_ids": block_position_ids(input_ids, attention_mask, marker)}
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def row_logps_and_entropies(
    model, input_ids, attention_mask, logits_to_keep, compute_entropy, compute_aux_loss, marker, autocast
):
    """The per-token logprobs (and entropies, with their graph) of training rows, through TRL's fused LM head, with
    the positions generation used (`row_model_inputs`)."""
    inputs = row_model_inputs(input_ids, attention_mask, marker)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-logits_to_keep] = -100
    extra = {"output_router_logits": True} if compute_aux_loss else {}
    with autocast():
        outputs = model(**inputs, labels=labels, fused_lm_head=True, use_cache=False, **extra)
    logps = outputs.log_probs[:, -logits_to_keep:]
    entropies = outputs.entropy[:, -logits_to_keep:] if compute_entropy else None
    aux_loss = outputs.aux_loss if compute_aux_loss else None
    return logps, entropies, aux_loss
