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


def packed_logps_and_entropies(
    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss, marker, autocast
):
    """TRL's chunked forward for rows that pack several windowed prompts (see `RolloutConfig.history_turns`):
    positions restart at every block marker and, with no 2D attention mask, transformers keeps the packed
    blocks apart (each block attends only to itself), so every answer is scored on exactly the context it was
    generated from."""
    batch_size = batch_size or input_ids.size(0)
    all_logps, all_entropies, all_aux = [], [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids = input_ids[start : start + batch_size]
        mask = attention_mask[start : start + batch_size]
        position_ids = block_position_ids(ids, mask, marker)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        extra = {"output_router_logits": True} if compute_aux_loss else {}
        with autocast():
            outputs = model(
                input_ids=ids,
                position_ids=position_ids,
                labels=labels,
                fused_lm_head=True,
                use_cache=False,
                **extra,
            )
        all_logps.append(outputs.log_probs[:, -logits_to_keep:])
        if compute_entropy:
            all_entropies.append(outputs.entropy[:, -logits_to_keep:])
        if compute_aux_loss:
            all_aux.append(outputs.aux_loss)
    logps = torch.cat(all_logps, dim=0)
    entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
    aux_loss = torch.stack(all_aux).mean() if compute_aux_loss else None
    return logps, entropies, aux_loss
