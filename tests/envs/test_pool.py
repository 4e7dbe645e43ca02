"""EnvPool: parallel stepping, timeouts, crashes, restarts, process cleanup and prefetch hints."""

import functools
import json
import os
import signal
import time

import psutil
import pytest
from helpers.pool_envs import ChildProcessEnv, ExitingEnv, FaultyToyEnv, PrefetchRecordingEnv
from helpers.scripted import ScriptedLM

from trl_epo.envs import EnvPool, ToyEnv
from trl_epo.envs.toy import expert_actions, make_tasks
from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("backend", ["process", "thread", "inline"])
def test_pool_plays_expert_episodes_in_parallel(backend):
    tasks = make_tasks("train", 4)
    with EnvPool(ToyEnv, 4, backend=backend) as pool:
        pool.reset(list(enumerate(tasks)))
        plans = [expert_actions(t) for t in tasks]
        won = [False] * 4
        for k in range(max(map(len, plans))):
            calls = [(i, plan[k]) for i, plan in enumerate(plans) if k < len(plan)]
            for (i, _), result in zip(calls, pool.step(calls)):
                won[i] = result.won
        assert all(won)


def test_faults_come_back_as_failed_results_and_slots_recover():
    task = make_tasks("train", 1)[0]
    faulty = {f: task.__class__(**{**task.to_row(), "extra": {"fault": f}}) for f in ("raise", "hang", "exit")}
    with EnvPool(FaultyToyEnv, 3, step_timeout=1.0) as pool:
        pool.reset([(0, faulty["raise"]), (1, faulty["hang"]), (2, faulty["exit"])])
        pids = pool.worker_pids()
        start = time.monotonic()
        results = pool.step([(0, "look"), (1, "look"), (2, "look")])
        assert time.monotonic() - start < 5
        assert [r.done and not r.won for r in results] == [True] * 3
        assert "injected env failure" in results[0].env_error
        assert "timed out" in results[1].env_error
        assert "died" in results[2].env_error
        assert pool.stats["env_exceptions"] == 1 and pool.stats["timeouts"] == 1 and pool.stats["worker_died"] == 1
        assert not alive(pids[1]) and not alive(pids[2])  # the hung worker was killed, the dead one reaped
        assert pool.worker_pids()[0] == pids[0]  # an env exception does not cost the worker
        # Every slot plays a healthy episode afterwards (fresh workers where needed).
        results = pool.reset([(0, task), (1, task), (2, task)])
        assert all(r.env_error is None for r in results)
        assert all(r.env_error is None for r in pool.step([(0, "look"), (1, "look"), (2, "look")]))
        # Stepping a slot whose worker was killed from outside fails cleanly.
        os.kill(pool.worker_pids()[1], signal.SIGKILL)
        time.sleep(0.2)
        assert "not running" in pool.step([(1, "look")])[0].env_error


def test_workers_outlive_the_preemption_signals_that_reach_them():
    """SLURM signals every process of a job step, env workers included: they ignore it (the trainer decides when to
    stop, and the pool kills them with SIGKILL), so the episode in flight completes."""
    tasks = make_tasks("train", 2)
    with EnvPool(ToyEnv, 2) as pool:
        pool.reset(list(enumerate(tasks)))
        for pid, sig in zip(pool.worker_pids(), (signal.SIGTERM, signal.SIGUSR1)):
            os.kill(pid, sig)
        time.sleep(0.3)
        results = pool.step([(0, "look"), (1, "look")])
        assert [r.env_error for r in results] == [None, None] and pool.stats["worker_died"] == 0


def test_thread_backend_timeouts_and_exceptions():
    task = make_tasks("train", 1)[0]
    hang = task.__class__(**{**task.to_row(), "extra": {"fault": "hang"}})
    boom = task.__class__(**{**task.to_row(), "extra": {"fault": "raise"}})
    with EnvPool(functools.partial(FaultyToyEnv, hang_seconds=2.0), 2, backend="thread", step_timeout=0.5) as pool:
        pool.reset([(0, hang), (1, boom)])
        results = pool.step([(0, "look"), (1, "look")])
        assert "timed out" in results[0].env_error and "injected" in results[1].env_error
        assert all(r.env_error is None for r in pool.reset([(0, task), (1, task)]))


def test_close_kills_each_worker_process_group():
    task = make_tasks("train", 1)[0]
    pool = EnvPool(ChildProcessEnv, 2)
    results = pool.reset([(0, task), (1, task)])
    children = [r.info["child_pid"] for r in results]
    workers = [r.info["worker_pid"] for r in results]
    assert all(alive(pid) for pid in children + workers)
    # A worker killed from outside leaves its child behind; the pool's kill of the process group still reaps it.
    os.kill(workers[0], signal.SIGKILL)
    time.sleep(0.2)
    assert "not running" in pool.step([(0, "look")])[0].env_error
    pool.close()
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in children + workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in children + workers)


def test_unpicklable_factory_is_refused_with_advice():
    with pytest.raises(TypeError, match="picklable"):
        EnvPool(lambda: ToyEnv(), 1)
    with pytest.raises(ValueError, match="backend"):
        EnvPool(ToyEnv, 1, backend="ray")


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_the_rollout_hints_the_next_wave(tmp_path, tokenizer, backend):
    log = tmp_path / "prefetch.jsonl"
    tasks = make_tasks("train", 6)
    rollout = MultiTurnRollout(
        functools.partial(PrefetchRecordingEnv, str(log)),
        RolloutConfig(pool_backend=backend, pool_size=2, max_turns=1, max_turn_tokens=20, progress_bar=False),
    )
    model = ScriptedLM(tokenizer, lambda conversation: "<action>look</action>")
    try:
        episodes = rollout.play(tasks, ModelGenerator(model, tokenizer), tokenizer).episodes
    finally:
        rollout.close()
    assert all(e.won for e in episodes)  # three waves of two episodes
    hinted = [json.loads(line)[0] for line in log.read_text().splitlines()]
    assert sorted((h["task"], h["seed"]) for h in hinted) == sorted((t.task, t.seed) for t in tasks[2:])


def test_workers_import_this_trl_epo_and_report_their_stderr(tmp_path, monkeypatch):
    # A directory holding another (broken) trl_epo package must not shadow this one in the workers.
    (tmp_path / "trl_epo").mkdir()
    (tmp_path / "trl_epo" / "__init__.py").write_text("raise ImportError('the wrong trl_epo')\n")
    monkeypatch.chdir(tmp_path)
    task = make_tasks("train", 1)[0]
    with EnvPool(ToyEnv, 1) as pool:
        assert pool.reset([(0, task)])[0].env_error is None
    # A worker that cannot load its env factory says why (its stderr is quoted).
    with EnvPool(functools.partial(ExitingEnv, "env could not start: missing simulator"), 1) as pool:
        error = pool.reset([(0, task)])[0].env_error
    assert "died" in error and "missing simulator" in error
