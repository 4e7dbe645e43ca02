"""EPOConfig: defaults, validation and the relation to TRL's own entropy bonus."""

import pytest
from conftest import base_config_kwargs
from trl import GRPOConfig

from trl_epo import EPOConfig


def test_defaults_follow_the_paper(tmp_path):
    config = EPOConfig(**base_config_kwargs(tmp_path))
    assert isinstance(config, GRPOConfig)
    assert config.epo_entropy_coef == 1e-3
    assert (config.epo_kappa_low, config.epo_kappa_high) == (0.0, 2.0)
    assert config.epo_phase_gamma == 3.0
    assert config.epo_smoothing == "hinge"
    assert config.epo_reference == "cumulative"
    assert config.epo_phase_schedule == "exp"
    assert config.epo_entropy_aggregation == "trajectory"
    assert config.epo_smoothing_alpha == 0.1
    assert config.epo_enabled


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("epo_entropy_coef", -1e-3, ">= 0"),
        ("epo_smoothing", "clip", "hinge"),
        ("epo_smoothing_alpha", -0.1, ">= 0"),
        ("epo_kappa_low", -0.5, ">= 0"),
        ("epo_kappa_high", -1.0, ">= 0"),
        ("epo_reference", "median", "cumulative"),
        ("epo_reference_ema_decay", 1.0, "[0, 1)"),
        ("epo_reference_window", 0, ">= 1"),
        ("epo_phase_schedule", "linear", "constant"),
        ("epo_phase_gamma", -3.0, ">= 0"),
        ("epo_entropy_aggregation", "sequence", "trajectory"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(tmp_path, field, value, words):
    with pytest.raises(ValueError) as error:
        EPOConfig(**base_config_kwargs(tmp_path, **{field: value}))
    assert field in str(error.value)
    assert words in str(error.value)


def test_kappa_low_above_kappa_high_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="epo_kappa_low.*epo_kappa_high"):
        EPOConfig(**base_config_kwargs(tmp_path, epo_kappa_low=1.5, epo_kappa_high=1.0))


def test_trl_entropy_bonus_composes_with_epo_with_a_warning(tmp_path):
    # TRL's bonus stays part of L_base (a GRPOConfig with entropy_coef is a drop-in); the warning names EPO's equivalent.
    with pytest.warns(UserWarning, match="epo_smoothing='none'"):
        EPOConfig(**base_config_kwargs(tmp_path, entropy_coef=0.01))
    with pytest.warns(UserWarning, match="use_adaptive_entropy=True"):
        EPOConfig(**base_config_kwargs(tmp_path, use_adaptive_entropy=True))
    config = EPOConfig(**base_config_kwargs(tmp_path, epo_entropy_coef=0.0, entropy_coef=0.01))
    assert not config.epo_enabled


def test_every_epo_field_has_help(tmp_path):
    from dataclasses import fields

    epo_fields = [f for f in fields(EPOConfig) if f.name.startswith("epo_")]
    assert len(epo_fields) >= 10
    assert all(f.metadata.get("help") for f in epo_fields)
