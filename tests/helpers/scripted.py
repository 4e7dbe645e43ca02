"""A scripted causal LM for tests: it "generates", through the real `generate` path and the real tokenizer, the
answer a Python policy chooses from the conversation so far."""

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class ScriptedConfig(PretrainedConfig):
    model_type = "scripted_lm"


class ScriptedLM(PreTrainedModel, GenerationMixin):
    """`policy(conversation_text) -> answer_text`; the model emits the answer's tokens one by one, then EOS.

    `plain_text=True` writes special-token strings in the answer (e.g. "<|im_start|>") with ordinary tokens, as a
    real model can; by default the tokenizer turns them into the special ids."""

    config_class = ScriptedConfig

    def __init__(self, tokenizer, policy, plain_text: bool = False):
        config = ScriptedConfig(
            vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        super().__init__(config)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.policy = policy
        self.header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.generation_config.use_cache = False
        self.generation_config.eos_token_id = tokenizer.eos_token_id
        self.generation_config.pad_token_id = tokenizer.pad_token_id
        self.calls = 0
        self.plain_text = plain_text

    def _next_token(self, ids):
        h = len(self.header)
        start = max(i for i in range(len(ids) - h + 1) if ids[i : i + h] == self.header) + h
        context, produced = ids[:start], ids[start:]
        answer = self.policy(self.tokenizer.decode(context))
        encoded = self.tokenizer(answer, add_special_tokens=False, split_special_tokens=self.plain_text)["input_ids"]
        target = encoded + [self.tokenizer.eos_token_id]
        return target[len(produced)] if len(produced) < len(target) else self.tokenizer.eos_token_id

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls += 1
        batch, length = input_ids.shape
        logits = torch.full((batch, length, self.config.vocab_size), -1e4)
        for b in range(batch):
            ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            logits[b, -1, self._next_token(ids.tolist())] = 0.0
        return CausalLMOutput(logits=logits + 0 * self.anchor)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
