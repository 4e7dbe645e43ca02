"""The env registry: names and aliases, per-env defaults (turns per episode, prompt style), registration rules and
errors that list what is known."""

import inspect

import pytest

from trl_epo.envs import registry
from trl_epo.envs.prompting import DEFAULT_INSTRUCTION, PromptStyle
from trl_epo.envs.registry import SCIWORLD_INSTRUCTION, EnvSpec, find_env, get_env, register_env, registered_envs


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registrations made by a test disappear with it."""
    monkeypatch.setattr(registry, "_ENVS", dict(registry._ENVS))


def test_the_envs_are_registered_and_aliases_resolve():
    assert sorted(registered_envs()) == ["alfworld", "quest", "sciworld", "toy"]
    assert get_env("scienceworld") is get_env("sciworld")
    assert get_env("SciWorld").name == "sciworld"  # names are case-insensitive
    assert find_env("nowhere") is None and find_env(None) is None and find_env("") is None


def test_per_env_defaults():
    assert {name: get_env(name).max_turns for name in ("toy", "sciworld", "alfworld")} == {
        "toy": 15,
        "sciworld": 30,
        "alfworld": 50,
    }
    assert get_env("sciworld").prompt_style().instruction == SCIWORLD_INSTRUCTION
    assert get_env("toy").prompt_style() == get_env("alfworld").prompt_style() == PromptStyle()
    assert PromptStyle().instruction == DEFAULT_INSTRUCTION
    assert {spec.extra for spec in registered_envs().values()} == {None, "sciworld", "alfworld"}


def test_prompt_style_overrides_set_to_none_keep_the_env_default():
    style = get_env("sciworld").prompt_style(instruction=None, max_observation_chars=100, show_admissible_actions=None)
    assert style.instruction == SCIWORLD_INSTRUCTION
    assert style.max_observation_chars == 100
    assert style.show_admissible_actions is True
    assert get_env("sciworld").prompt_style(instruction="Be brief: {example}").instruction == "Be brief: {example}"
    assert get_env("sciworld").prompt_style().instruction == SCIWORLD_INSTRUCTION  # an override is not remembered


def test_envs_with_a_move_limit_default_it_to_their_turns_per_episode():
    """The env's own move limit and the registry's turns per episode are the same number of the paper."""
    pytest.importorskip("scienceworld")
    for name in ("sciworld", "alfworld"):
        spec = get_env(name)
        env_class = getattr(spec.load(), spec.env_class)
        assert inspect.signature(env_class).parameters["max_turns"].default == spec.max_turns, name


def test_the_registry_splits_are_the_ones_the_env_modules_define():
    pytest.importorskip("scienceworld")
    from trl_epo.envs.alfworld import SPLIT_DIRS
    from trl_epo.envs.sciworld import SPLITS

    assert set(get_env("sciworld").splits) == set(SPLITS)
    assert set(get_env("alfworld").splits) <= set(SPLIT_DIRS)


def test_the_toy_registry_splits_are_the_ones_its_module_accepts():
    spec = get_env("toy")
    assert all(spec.make_tasks(split, num_tasks=2) for split in spec.splits)
    with pytest.raises(ValueError, match="Unknown toy split"):
        spec.make_tasks("validation")


def test_register_env_rejects_a_name_or_alias_of_another_env(isolated_registry):
    with pytest.raises(ValueError, match="'scienceworld' already names the 'sciworld' environment; choose another"):
        register_env(EnvSpec("scienceworld", "trl_epo.envs.toy", "ToyEnv", ("train",)))
    with pytest.raises(ValueError, match="'toy' already names the 'toy' environment"):
        register_env(EnvSpec("my-env", "trl_epo.envs.toy", "ToyEnv", ("train",), aliases=("toy",)))
    assert "my-env" not in registered_envs()
    # The same name replaces the entry (e.g. to change its defaults).
    replaced = register_env(EnvSpec("toy", "trl_epo.envs.toy", "ToyEnv", ("train",), max_turns=5))
    assert get_env("toy") is replaced and get_env("toy").max_turns == 5


def test_a_registered_env_gets_defaults_and_a_picklable_factory(isolated_registry):
    import pickle

    register_env(EnvSpec("corridor", "trl_epo.envs.toy", "ToyEnv", ("train",), aliases=("hall",), max_turns=7))
    spec = get_env("hall")
    assert spec.name == "corridor" and spec.max_turns == 7
    factory = pickle.loads(pickle.dumps(spec.factory(max_steps=3)))
    assert factory().max_steps == 3


def test_get_env_error_lists_the_known_envs():
    with pytest.raises(
        ValueError, match=r"Unknown environment 'webshop'; known: \['alfworld', 'quest', 'sciworld', 'toy'\]"
    ):
        get_env("webshop")
    with pytest.raises(ValueError, match="register_env"):
        get_env("webshop")


def test_a_missing_dependency_names_the_pip_extra(isolated_registry):
    register_env(EnvSpec("ghost", "trl_epo.envs.no_such_module", "GhostEnv", ("train",), extra="ghost"))
    with pytest.raises(ImportError, match=r"The 'ghost' environment needs a missing package.*trl-epo\[ghost\]"):
        get_env("ghost").factory()
