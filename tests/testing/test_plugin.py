"""The pytest plugin: profile, fixtures, marker."""
import os

import pytest
from hypothesis import settings

import kvpass.testing as kt
from kvpass.testing import profiles


def test_the_profile_named_by_the_environment_is_loaded(pytestconfig):
    name = profiles.profile_name()
    if name == profiles.OFF or pytestconfig.getoption("hypothesis_profile", default=None):
        pytest.skip("hypothesis' profile is chosen elsewhere in this run")
    assert settings.default.max_examples == profiles._SETTINGS[name]["max_examples"]
    assert settings.default.deadline is None


def test_unknown_profile_names_the_allowed_ones(monkeypatch):
    monkeypatch.setenv(profiles.ENV_VAR, "nightly")
    with pytest.raises(ValueError, match=r"expected one of \('ci', 'dev', 'gpu', 'off'\)"):
        profiles.profile_name()


def test_gpu_profile_draws_larger_problems(monkeypatch):
    monkeypatch.setenv(profiles.ENV_VAR, "gpu")
    assert profiles.default_sizes().max_kv_len > 1024  # several 256-key blocks with a ragged end
    monkeypatch.setenv(profiles.ENV_VAR, "ci")
    assert profiles.default_sizes().max_kv_len <= 160


def test_fixtures_give_the_device_and_a_bound_check(kvpass_device, check_attention):
    expected = os.environ.get("KVPASS_TEST_DEVICE") or kt.default_device()
    assert kvpass_device == expected
    assert check_attention.func is kt.check_kernel and check_attention.keywords == {"device": kvpass_device}


def test_requires_triton_marker_is_registered(pytestconfig):
    assert any(line.startswith("requires_triton") for line in pytestconfig.getini("markers"))
