"""`OpenEnvTextEnv` against REAL OpenEnv servers on loopback, built from the `openenv` package's own server classes
(`create_fastapi_app` + uvicorn) around a small env defined in the tests (`helpers.openenv_server`): the TextEnv
contract, a played episode, one EPO step, and the failures (connection refused, a server killed mid-episode, a slow
step) as counted env errors that never stop a rollout."""

import functools
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from conftest import base_config_kwargs
from datasets import Dataset
from helpers import openenv_server
from helpers.launches import free_port
from helpers.openenv_server import DoorAction, DoorEnvironment, DoorObservation
from helpers.scripted import ScriptedLM
from openenv.core.env_server.http_server import create_fastapi_app  # the `openenv` extra

from trl_epo import EPOConfig, EPOTrainer
from trl_epo.envs.base import TaskSpec, task_rows
from trl_epo.envs.checker import check_text_env
from trl_epo.envs.openenv import OpenEnvTextEnv
from trl_epo.envs.pool import EnvPool
from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig


TESTS = Path(__file__).resolve().parents[1]
TASK = TaskSpec(env="door", task="escape", seed=3, extra={"task_description": "Leave the room."})


@pytest.fixture(scope="module")
def server_url():
    """The door env served in this process (one import of openenv for every test of the module)."""
    app = create_fastapi_app(DoorEnvironment, DoorAction, DoorObservation, max_concurrent_envs=16)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the OpenEnv server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def factory(url, **kwargs):
    return functools.partial(OpenEnvTextEnv, url, observation_field="text", **kwargs)


def test_adapter_passes_check_text_env(server_url):
    make = factory(server_url)
    report = check_text_env(make(), TASK, factory=make)
    assert report.ok and "model_text_is_data" in report.passed and "factory_pickles" in report.passed


def test_an_episode_over_the_websocket_session(server_url):
    env = factory(server_url)()
    first = env.reset(TASK)
    assert first.observation == openenv_server.ROOM and first.info["task_description"] == "Leave the room."
    assert env.state()["episode_id"] == "seed-3"  # reset(seed=task.seed) reached the server
    took = env.step("take key")
    assert (took.observation, took.done, took.reward) == ("You take the key.", False, 0.0)
    won = env.step("open door")
    assert (won.done, won.won, won.reward, won.info["score"]) == (True, True, 1.0, 100.0)
    assert env.state()["step_count"] == 2
    env.close()
    env.close()
    all_fields = OpenEnvTextEnv(server_url)  # no observation_field: every field but done/reward/metadata, as JSON
    assert all_fields.reset(TASK).observation == f'{{"text": "{openenv_server.ROOM}", "has_key": false}}'
    all_fields.close()


def test_epo_trains_one_step_on_an_openenv_server(tokenizer, make_model, tmp_path):
    # its own server: the module's may still hold sessions of the other tests
    app = create_fastapi_app(DoorEnvironment, DoorAction, DoorObservation, max_concurrent_envs=8)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    args = EPOConfig(
        **base_config_kwargs(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=400,
            env_max_turns=2,
            env_max_turn_tokens=8,
            env_pool_backend="thread",
            temperature=1.0,
        )
    )
    columns = task_rows([TaskSpec(env="door", task="escape", seed=s) for s in (0, 1)])
    trainer = EPOTrainer(
        make_model(),
        args=args,
        train_dataset=Dataset.from_dict(columns),
        processing_class=tokenizer,
        env_factory=factory(f"http://127.0.0.1:{port}"),
    )
    try:
        trainer.train()
    finally:
        trainer.close_envs()
        server.should_exit = True
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 1 and "epo/entropy" in logged[0] and logged[0]["rollout/env_error_episodes"] == 0
    episode = trainer.env_rollout.last_batch.episodes[0]
    assert openenv_server.ROOM in tokenizer.decode(episode.prompt_ids)


def test_refused_connection_and_slow_steps_are_env_errors(server_url):
    with EnvPool(factory(f"http://127.0.0.1:{free_port()}", connect_timeout_s=2), 1, backend="thread") as pool:
        (refused,) = pool.reset([(0, TASK)])
    assert refused.done and "Failed to connect" in refused.env_error
    openenv_server.STEP_DELAY = 3.0  # the in-process server's "wait" now takes 3 s
    try:
        with EnvPool(factory(server_url, message_timeout_s=0.5), 2, backend="thread", step_timeout=20) as pool:
            pool.reset([(0, TASK), (1, TASK)])
            slow, fine = pool.step([(0, "wait"), (1, "take key")])
            assert slow.done and "did not answer step within 0.5 s" in slow.env_error and fine.env_error is None
            (again,) = pool.reset([(0, TASK)])  # the slot reconnects with a fresh session
            assert again.env_error is None and again.observation == openenv_server.ROOM
        with EnvPool(factory(server_url, message_timeout_s=30), 1, backend="thread", step_timeout=0.5) as pool:
            pool.reset([(0, TASK)])
            (hung,) = pool.step([(0, "wait")])  # the pool's own step timeout bounds it too
            assert hung.done and "timed out" in hung.env_error
    finally:
        openenv_server.STEP_DELAY = 0.0


@pytest.mark.slow
def test_a_server_killed_mid_episode_fails_its_episodes_not_the_rollout(tokenizer):
    """A separate server process, killed between two steps: the live episodes end as env errors, the rollout
    returns, and the next reset (a restarted server) plays again."""
    port = free_port()
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}

    def start():
        process = subprocess.Popen(
            [sys.executable, "-m", "helpers.openenv_server", "--port", str(port)], env=environment, cwd=TESTS
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return process
            time.sleep(0.2)
        process.kill()
        raise AssertionError("the OpenEnv server process did not start")

    process = start()
    killed = []

    def policy(conversation):  # takes the key, then kills the server before it would open the door
        if "You take the key." in conversation and not killed:
            process.kill()
            process.wait()
            killed.append(True)
        return "<action>take key</action>" if not killed else "<action>open door</action>"

    rollout = MultiTurnRollout(
        factory(f"http://127.0.0.1:{port}", connect_timeout_s=2, message_timeout_s=5),
        RolloutConfig(pool_backend="thread", progress_bar=False, max_turns=4, max_episode_tokens=4000),
    )
    try:
        batch = rollout.play([TASK, TASK], ModelGenerator(ScriptedLM(tokenizer, policy), tokenizer), tokenizer)
        assert killed and all(e.env_error is not None for e in batch.episodes)
        assert batch.stats.env_error_episodes == 2 and batch.rewards == [None, None]  # excluded, not a real 0
        process = start()  # the server is back: the same rollout's next reset reconnects

        def solver(conversation):
            return "<action>open door</action>" if "You take the key." in conversation else "<action>take key</action>"

        again = rollout.play([TASK], ModelGenerator(ScriptedLM(tokenizer, solver), tokenizer), tokenizer)
        assert again.episodes[0].won and again.stats.env_error_episodes == 0
    finally:
        rollout.close()
        process.kill()
        process.wait()
