"""Tiny models and tokenizers built locally, for offline quickstarts, tests and benchmarks.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in memory with the `tokenizers` library
(so it encodes any text, unicode included) and carries a ChatML template; the model is a randomly initialised
Qwen2/Llama causal LM of a few layers built from a config.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast


CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

BASE_CORPUS = [
    "You are an agent acting in a text environment. Think briefly, then answer with one action inside "
    "<action> and </action> tags, for example <action>open door</action>.",
    "Task: find the key, open the door and reach the goal. Observation: You are in the hall. You see a door "
    "to the north, a table and a box. Admissible actions: go north, go south, go east, go west, take key, "
    "open door, open box, look, inventory.",
    "The answer is 42. Count from one to ten: 1 2 3 4 5 6 7 8 9 10. Yes no true false.",
    "Nothing happens. Invalid action: answer with exactly one action inside <action></action> tags.",
    "ScienceWorld: focus on the substance, move it to the stove, activate the stove, wait, look around, "
    "pick up the thermometer, use thermometer on water, go to kitchen, open freezer, mix, pour.",
    "ALFWorld: go to countertop 1, take apple 1 from countertop 1, open fridge 1, cool apple 1 with fridge 1, "
    "put apple 1 in/on diningtable 1, heat, clean, examine, use desklamp 1.",
]


def build_tiny_tokenizer(texts: Iterable[str] = (), vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` plus a small built-in corpus, with a ChatML chat template.

    ``<|im_end|>`` is the end-of-turn (EOS) token and ``<|endoftext|>`` the padding token, as in Qwen2.5.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*BASE_CORPUS, *texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    architecture: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    **config_kwargs,
):
    """A randomly initialised causal LM (``"qwen2"`` or ``"llama"``) sized for ``tokenizer``; float32, CPU."""
    import torch
    from transformers import AutoConfig

    if architecture not in ("qwen2", "llama"):
        raise ValueError(f"architecture must be 'qwen2' or 'llama', got {architecture!r}.")
    config = AutoConfig.for_model(
        architecture,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
