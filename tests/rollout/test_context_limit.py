"""The HF generate path never feeds a model more positions than it has: an episode whose context fills the model's
`max_position_embeddings` ends as truncated ("context_limit"), as on the vLLM path (`max_model_len`)."""

from conftest import base_config_kwargs

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.envs.toy import ToyEnv, make_dataset, make_tasks
from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig
from trl_epo.rollout.generation import model_context_limit


class LongObservationEnv(ToyEnv):
    """Every observation is long: a full-context conversation outgrows a short model in a few turns."""

    def step(self, action):
        result = super().step(action)
        result.observation = result.observation + " The corridor goes on." * 20
        return result


class FedLengths(ModelGenerator):
    """Records the longest prompt + answer fed to the model."""

    longest = 0

    def generate(self, contexts, limits):
        outputs = super().generate(contexts, limits)
        for context, (ids, _) in zip(contexts, outputs):
            self.longest = max(self.longest, len(context) + len(ids))
        return outputs


def test_episodes_end_at_the_models_maximum_positions(tokenizer, make_model):
    model = make_model()
    tasks = make_tasks("train", 2)
    rollout = MultiTurnRollout(ToyEnv, RolloutConfig(pool_backend="thread", progress_bar=False, max_turns=1))
    first = len(rollout.play(tasks, ModelGenerator(model, tokenizer), tokenizer).episodes[0].prompt_ids)
    rollout.close()

    model.config.max_position_embeddings = limit = first + 60  # room for about two turns
    generator = FedLengths(model, tokenizer)
    assert generator.max_context_tokens == model_context_limit(model) == limit
    config = RolloutConfig(pool_backend="thread", progress_bar=False, max_turns=30, max_turn_tokens=16)
    rollout = MultiTurnRollout(LongObservationEnv, config)
    batch = rollout.play(tasks, generator, tokenizer)
    rollout.close()
    assert generator.longest <= limit
    ended = [e.truncated for e in batch.episodes]
    assert "context_limit" in ended and batch.stats.context_limited == ended.count("context_limit")
    assert all(e.turns < 30 for e in batch.episodes)


def test_a_first_prompt_longer_than_the_model_ends_its_episode_before_generating(tokenizer, make_model, tmp_path):
    model = make_model(max_position_embeddings=32)  # shorter than the toy env's first prompt
    args = EPOConfig(
        **base_config_kwargs(
            tmp_path, per_device_train_batch_size=2, num_generations=2, max_completion_length=400, env_max_turns=3
        ),
        env_pool_backend="thread",
    )
    trainer = EPOTrainer(
        model, args=args, train_dataset=make_dataset("train", 2), processing_class=tokenizer, env_factory=ToyEnv
    )
    batch = trainer._play_rollout_batch([dict(r) for r in make_dataset("train", 1) for _ in range(2)])
    trainer.close_envs()
    assert [e.truncated for e in batch.episodes] == ["context_limit"] * 2
    assert all(e.turns == 0 for e in batch.episodes)
