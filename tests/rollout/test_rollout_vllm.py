"""The rollout's vLLM path, against a stand-in for TRL's `VLLMGeneration` (vLLM itself needs a GPU): a real tiny HF
model samples the tokens and reports their log-probabilities through the same `generate(prompts, images,
num_generations)` interface TRL's backend has."""

import math

import torch
from conftest import base_config_kwargs

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.envs.toy import ToyEnv, make_dataset


class StandInVLLM:
    """Implements the part of trl's VLLMGeneration the rollout uses: `generate`, `sync_weights`,
    `max_completion_length`."""

    def __init__(self, model, eos_token_id):
        self.model = model
        self.eos_token_id = eos_token_id
        self.max_completion_length = 999
        self.calls = []
        self.syncs = 0

    def sync_weights(self):
        self.syncs += 1

    @torch.no_grad()
    def generate(self, prompts, images, num_generations, profiler=None):
        assert images is None and num_generations == 1
        self.calls.append((len(prompts), self.max_completion_length))
        completions, logprobs = [], []
        for ids in prompts:
            context = torch.tensor([ids])
            out, lps = [], []
            for _ in range(self.max_completion_length):
                logits = self.model(input_ids=context).logits[0, -1].float()
                logp = torch.log_softmax(logits, -1)
                token = int(torch.multinomial(logp.exp(), 1))
                out.append(token)
                lps.append([float(logp[token])])
                context = torch.cat([context, torch.tensor([[token]])], 1)
                if token == self.eos_token_id:
                    break
            completions.append(out)
            logprobs.append(lps)
        return [list(p) for p in prompts], completions, logprobs, None


def test_vllm_backend_gets_per_turn_limits_and_its_logprobs_reach_the_batch(tokenizer, make_model, tmp_path):
    args = EPOConfig(
        **base_config_kwargs(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=2,
            num_generations=2,
            max_completion_length=120,
            env_max_turns=3,
            env_max_turn_tokens=7,
            env_pool_backend="thread",
        )
    )
    trainer = EPOTrainer(
        make_model(), args=args, train_dataset=make_dataset("train", 2), processing_class=tokenizer, env_factory=ToyEnv
    )
    backend = StandInVLLM(trainer.model, tokenizer.eos_token_id)
    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, backend, -1
    rows = [dict(r) for r in make_dataset("train", 1)] * 2
    output = trainer._play_rollout_batch(rows).trl_output()

    assert backend.syncs == 1  # weights synced once for the whole multi-turn rollout
    assert len(backend.calls) == 3 and all(limit == 7 for _, limit in backend.calls)  # one call per turn
    assert backend.max_completion_length == 999  # restored
    for ids, mask, logprobs in zip(output["completion_ids"], output["env_mask"], output["logprobs"]):
        assert len(logprobs) == len(ids) == len(mask)
        assert all(lp < 0 and math.isfinite(lp) for lp, m in zip(logprobs, mask) if m == 1)
        assert all(lp == 0.0 for lp, m in zip(logprobs, mask) if m == 0)
    episode = trainer.env_rollout.last_batch.episodes[0]
    with torch.no_grad():
        sequence = torch.tensor([episode.prompt_ids + episode.completion_ids])
        logp = torch.log_softmax(trainer.model(input_ids=sequence).logits[0].float(), -1)
    offset = len(episode.prompt_ids)
    for i, (token, m, lp) in enumerate(zip(episode.completion_ids, episode.env_mask, episode.logprobs)):
        if m == 1:
            assert abs(float(logp[offset + i - 1, token]) - lp) < 1e-4
    trainer.close_envs()
