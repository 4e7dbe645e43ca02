"""Chat templates for supervised fine-tuning on whole conversations (TRL's `SFTTrainer` with `assistant_only_loss`).

TRL trains on the assistant turns of a conversation only when the tokenizer's chat template marks them with
``{% generation %}`` ... ``{% endgeneration %}`` (transformers' `return_assistant_tokens_mask`). Plain ChatML
templates (Qwen's, `trl_epo.tiny`'s) do not, so a whole expert episode could only be trained as one row per turn.
`enable_assistant_masks` swaps such a template for `CHATML_TRAINING_TEMPLATE`, which renders every conversation to
the very same text, so the model is trained on exactly the contexts it will see in the rollout.
"""

from __future__ import annotations


# Plain ChatML with the assistant turns marked: renders exactly like plain ChatML.
CHATML_TRAINING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
# Conversations on which a template must render like CHATML_TRAINING_TEMPLATE before it is swapped: with and
# without a system message, ending on a user and on an assistant turn.
_PROBE_CONVERSATIONS = (
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ],
    [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}],
)


def enable_assistant_masks(tokenizer) -> bool:
    """Whether `tokenizer`'s chat template marks assistant turns (needed by SFT's `assistant_only_loss`).

    A template that already marks them is kept (True). A plain ChatML template is swapped for
    `CHATML_TRAINING_TEMPLATE`, which renders every conversation identically (True). Any other template is left
    alone (False): train on one prompt/completion row per turn instead.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return False
    if "generation" in template and "endgeneration" in template:
        return True

    def render(chat_template, messages, prompt):
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=prompt
        )

    try:
        same = all(
            render(template, messages, prompt) == render(CHATML_TRAINING_TEMPLATE, messages, prompt)
            for messages in _PROBE_CONVERSATIONS
            for prompt in (False, True)
        )
    except Exception:  # noqa: BLE001 - a template that cannot render the probes is simply not plain ChatML
        return False
    if same:
        tokenizer.chat_template = CHATML_TRAINING_TEMPLATE
    return same
