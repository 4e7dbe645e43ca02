"""The ChatML training template: assistant turns marked for SFT's `assistant_only_loss`, rendering unchanged."""

from trl_epo.chat_templates import enable_assistant_masks


def test_chatml_template_gains_assistant_masks_without_changing_its_rendering():
    from trl_epo.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    conversation = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "<action>look around</action>"},
        {"role": "user", "content": "v"},
    ]
    before = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert enable_assistant_masks(tok)
    assert tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == before
    out = tok.apply_chat_template(conversation[:3], return_assistant_tokens_mask=True, return_dict=True)
    answer = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(answer) == "<action>look around</action><|im_end|>"
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # not ChatML: left alone
    assert not enable_assistant_masks(tok)
