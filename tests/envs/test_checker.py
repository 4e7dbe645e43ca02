"""check_text_env: every registered env keeps the TextEnv contract, and each check fails, with its fix, on an env
broken in just that way."""

import functools
import re
import sys
from pathlib import Path

import pytest

from trl_epo.envs import StepResult, ToyEnv, check_text_env
from trl_epo.envs.checker import CHECK_NAMES, CheckReport, TextEnvContractError
from trl_epo.envs.registry import get_env, registered_envs


# ---------------------------------------------------------------------------------------------------------------------
# The registered environments
# ---------------------------------------------------------------------------------------------------------------------


def _toy_setup():
    spec = get_env("toy")
    return spec.factory(), spec.make_tasks("train", num_tasks=1)[0]


def _sciworld_setup():
    import helpers.sciworld_required  # noqa: F401  (skips this test without scienceworld or Java)

    spec = get_env("sciworld")
    return spec.factory(show_objects=True), spec.make_tasks("train", num_tasks=1, seed=0)[0]


def _alfworld_setup():
    pytest.importorskip("alfworld", reason="the alfworld package is not installed (pip install 'trl-epo[alfworld]')")
    from helpers.alfworld_testdata import generated_games, real_games_root

    real = real_games_root()  # the official games when the test data is there, else generated ones
    root, split = (real, "iid") if real is not None else (generated_games()[0], "train")
    spec = get_env("alfworld")
    return spec.factory(data_root=root), spec.make_tasks(split, data_root=root, num_tasks=1)[0]


def _quest_setup():
    spec = get_env("quest")
    return spec.factory(), spec.make_tasks("train", num_tasks=1)[0]


ENV_SETUPS = {"toy": _toy_setup, "quest": _quest_setup, "sciworld": _sciworld_setup, "alfworld": _alfworld_setup}


@pytest.mark.parametrize("name", sorted(registered_envs()))
def test_every_registered_env_keeps_the_contract(name):
    assert name in ENV_SETUPS, f"give the new env {name!r} a setup in ENV_SETUPS, so that its contract is checked"
    factory, task = ENV_SETUPS[name]()
    report = check_text_env(factory(), task, factory=factory)
    assert report.ok and report.passed == list(CHECK_NAMES), str(report)


# ---------------------------------------------------------------------------------------------------------------------
# Envs broken in one way each (module level: the pickling check needs importable classes)
# ---------------------------------------------------------------------------------------------------------------------


class MissingCloseEnv:
    def reset(self, task):
        return StepResult("a room")

    def step(self, action):
        return StepResult("a room")


class DictResetEnv(ToyEnv):
    def reset(self, task):
        return vars(super().reset(task))


class BytesObservationEnv(ToyEnv):
    def reset(self, task):
        result = super().reset(task)
        result.observation = result.observation.encode()
        return result


class IntDoneEnv(ToyEnv):
    def reset(self, task):
        result = super().reset(task)
        result.done = 0
        return result


class ListTaskDescriptionEnv(ToyEnv):
    def reset(self, task):
        result = super().reset(task)
        result.info["task_description"] = [result.info["task_description"]]
        return result


class TupleActionsEnv(ToyEnv):
    def reset(self, task):
        result = super().reset(task)
        result.admissible_actions = tuple(result.admissible_actions)
        return result


class EnvErrorEnv(ToyEnv):
    def reset(self, task):
        result = super().reset(task)
        result.info["env_error"] = "not mine to set"
        return result


class RaisingEnv(ToyEnv):
    def step(self, action):
        if action not in self.admissible_actions():
            raise ValueError(f"unknown command {action!r}")
        return super().step(action)


class ExitingEnv(ToyEnv):
    def step(self, action):
        if "<|im_start|>" in action:
            sys.exit("special tokens!")
        return super().step(action)


class ShellingOutEnv(ToyEnv):
    """Stands in for ``subprocess.run(action, shell=True)``: does what a shell would do with ``touch PATH``."""

    def step(self, action):
        for path in re.findall(r"touch (\S+)", action):
            Path(path).touch()
        return super().step(action)


class StaleResetEnv(ToyEnv):
    """Forgets to reset its move counter: after max_steps moves every episode is over at once."""

    def __init__(self):
        super().__init__(max_steps=3)

    def reset(self, task):
        steps = getattr(self, "steps", 0)
        result = super().reset(task)
        self.steps = steps
        self.done = result.done = steps >= self.max_steps
        return result


class UnseededEnv(ToyEnv):
    counter = 0

    def reset(self, task):
        result = super().reset(task)
        UnseededEnv.counter += 1
        result.observation += f" A clock shows {UnseededEnv.counter} o'clock."
        return result


class CloseOnceEnv(ToyEnv):
    def close(self):
        if getattr(self, "closed", False):
            raise RuntimeError("already closed")
        self.closed = True


BROKEN = [
    # (env factory, check_text_env kwargs, the failed checks, a phrase of the message)
    (MissingCloseEnv, {}, {"protocol"}, "no close method"),
    (DictResetEnv, {}, {"reset_returns_step_result"}, "returned dict, not a StepResult"),
    (BytesObservationEnv, {}, {"observation_is_str"}, "observation is bytes"),
    (IntDoneEnv, {}, {"reward_done_won_types"}, "done is int (0), not bool"),
    (ListTaskDescriptionEnv, {}, {"task_description_is_str"}, "info['task_description'] is list, not str"),
    (TupleActionsEnv, {}, {"admissible_actions_are_strs"}, "give None (the env cannot list its actions) or a list"),
    (EnvErrorEnv, {}, {"info_conventions"}, "only EnvPool sets it"),
    (RaisingEnv, {}, {"model_text_is_data"}, 'raised: ValueError: "unknown command'),
    (ExitingEnv, {}, {"model_text_is_data"}, "step(<special tokens>) tried to end the process: SystemExit"),
    (ShellingOutEnv, {}, {"model_text_is_data"}, "step(<shell metacharacters>) ran the model's text as code"),
    (StaleResetEnv, {}, {"reset_starts_fresh_episode"}, "a reset must start a new episode"),
    (UnseededEnv, {}, {"same_task_same_start"}, "two resets to the same task gave different first observations"),
    (CloseOnceEnv, {}, {"close_is_idempotent"}, "a second close() raised RuntimeError"),
    (ToyEnv, {"factory": lambda: ToyEnv()}, {"factory_pickles"}, "the factory does not pickle"),
]


@pytest.mark.parametrize("env_class, kwargs, failed, phrase", BROKEN, ids=[min(f) for _, _, f, _ in BROKEN])
def test_each_check_fails_with_its_fix_on_an_env_broken_that_way(env_class, kwargs, failed, phrase):
    task = get_env("toy").make_tasks("train", num_tasks=1)[0]
    report = check_text_env(env_class(), task, raise_on_failure=False, **kwargs)
    assert set(report.failed) == failed, str(report)
    (message,) = report.failed.values()
    assert phrase in message, message
    assert set(report.passed) | set(report.failed) | set(report.skipped) == set(CHECK_NAMES)


def test_a_failure_raises_an_assertion_error_listing_every_fix():
    task = get_env("toy").make_tasks("train", num_tasks=1)[0]
    with pytest.raises(TextEnvContractError) as caught:
        check_text_env(MissingCloseEnv(), task)
    error = caught.value
    assert isinstance(error, AssertionError) and isinstance(error.report, CheckReport)
    assert "MissingCloseEnv breaks the TextEnv contract (1 failed check(s))" in str(error)
    assert "- protocol: the env has no close method(s)" in str(error)
    assert "Skipped because of those: reset_returns_step_result" in str(error)
    report = error.report
    assert not report.ok and report.passed == ["factory_pickles"]
    assert "FAIL protocol" in str(report) and "SKIP observation_is_str: needs reset_returns_step_result" in str(report)


def test_determinism_is_an_optional_check():
    task = get_env("toy").make_tasks("train", num_tasks=1)[0]
    report = check_text_env(UnseededEnv(), task, check_determinism=False)
    assert report.ok and report.skipped == {"same_task_same_start": "check_determinism=False"}


def test_a_partial_factory_pickles_and_the_env_ends_closed():
    task = get_env("toy").make_tasks("train", num_tasks=1)[0]
    env = ToyEnv(max_steps=20)
    assert check_text_env(env, task, factory=functools.partial(ToyEnv, max_steps=20)).ok
    assert env._spec is None  # ToyEnv.close() forgets its task
