"""GiGPO + EPO training steps on the real ALFWorld (generated games) and ScienceWorld (JVMs) environments, with their
canonical anchor keys: ALFWorld's world-state digest and ScienceWorld's sorted room and inventory."""

import functools

import pytest
from conftest import base_config_kwargs
from test_alfworld_train import train_alfworld_tiny

from trl_epo.envs.alfworld import AlfWorldEnv, make_tasks


def test_alfworld_state_keys_name_states_not_feedback(generated_root):
    env = AlfWorldEnv(data_root=generated_root)
    try:
        first = env.reset(make_tasks("train", generated_root)[0])
        places = [a for a in first.admissible_actions if a.startswith("go to ")]
        there, elsewhere, back = env.step(places[0]), env.step(places[1]), env.step(places[0])
        nothing = env.step("dance wildly")  # not a command: "Nothing happens.", the state is unchanged
    finally:
        env.close()
    assert first.info["anchor"].startswith("alfworld:")
    assert there.info["anchor"] == back.info["anchor"] == nothing.info["anchor"] != elsewhere.info["anchor"]
    assert nothing.observation != back.observation  # the text differs, the state does not


@pytest.mark.slow
def test_gigpo_with_epo_trains_a_step_on_alfworld_games(generated_root, tmp_path):
    trainer = train_alfworld_tiny(
        generated_root,
        tmp_path / "run",
        "--max_steps", "1",
        "--env_advantage_estimator", "gigpo",
        "--env_gigpo_step_norm", "mean_std_norm",
        "--env_advantage_baseline", "rows",
    )  # fmt: skip
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert trainer.state.global_step == 1 and "epo/entropy" in log
    # the first turns of a group share the reset's state: at least those are anchored
    assert log["gigpo/anchor_coverage"] > 0 and log["gigpo/step_groups"] >= 1 and "gigpo/step_adv_std" in log
    episodes = trainer.env_rollout.last_batch.episodes
    assert all(k.startswith("alfworld:") for e in episodes for k in e.anchor_keys())
    assert all(len(e.anchor_keys()) == e.turns for e in episodes)


@pytest.mark.slow
def test_gigpo_with_epo_trains_a_step_on_sciworld(tokenizer, make_model, tmp_path):
    pytest.importorskip("helpers.sciworld_required")  # skips without scienceworld or Java
    from test_sciworld_train import INSTRUCTION, teach_one_command

    from trl_epo import EPOConfig, EPOTrainer
    from trl_epo.envs.sciworld import ScienceWorldEnv, make_dataset

    args = EPOConfig(
        **base_config_kwargs(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=1024,
            env_max_turns=3,
            env_max_turn_tokens=12,
            env_pool_size=2,
            env_instruction=INSTRUCTION,
            env_advantage_estimator="gigpo",
        )
    )
    dataset = make_dataset("train", num_tasks=4, seed=0, task_types=["find-living-thing", "boil"])
    factory = functools.partial(ScienceWorldEnv, max_turns=2, show_objects=False, show_action_templates="never")
    model = make_model()
    assert teach_one_command(model, tokenizer, [dataset[i] for i in range(2)], factory) < 0.3
    trainer = EPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer, env_factory=factory)
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["rollout/invalid_turn_rate"] < 1.0 and "epo/entropy" in log
    assert log["gigpo/anchor_coverage"] > 0 and log["gigpo/step_groups"] >= 1
    episodes = trainer.env_rollout.last_batch.episodes
    keys = [k for e in episodes for k in e.anchor_keys()]
    assert keys and all("--- inventory" in k or k == "sciworld:done" for k in keys)
    env = ScienceWorldEnv(max_turns=2, show_objects=False, show_action_templates="never", state_keys=False)
    try:
        assert "anchor" not in env.reset(dataset[0]).info  # no JVM calls for keys nobody reads
    finally:
        env.close()
