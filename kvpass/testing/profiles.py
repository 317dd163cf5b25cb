"""Hypothesis profiles and the default problem sizes that go with them.

``KVPASS_HYPOTHESIS_PROFILE`` picks one: "ci" (the default: few, small examples, for a CPU under
``TRITON_INTERPRET=1``), "dev" (more examples, same sizes), "gpu" (many examples and larger
problems, run on the GPU once per kernel change). The pytest plugin loads it at start-up; outside
pytest call ``load_profile()``. Nothing is registered or loaded at import.
"""
from __future__ import annotations

import dataclasses
import os

from hypothesis import HealthCheck, settings

ENV_VAR = "KVPASS_HYPOTHESIS_PROFILE"
DEFAULT_PROFILE = "ci"
OFF = "off"  # KVPASS_HYPOTHESIS_PROFILE=off: leave hypothesis' settings alone


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Bounds of the default size strategies (``strategies.attention_problems``)."""

    batch_sizes: tuple[int, ...]
    kv_heads: tuple[int, ...]
    max_q_len: int
    max_kv_len: int
    block_sizes: tuple[int, ...]  # KV lengths at b, 2b, 3b (+-1) are drawn often: ragged ends


# Sizes: the CI profile keeps the float64 reference and the interpreted kernels at milliseconds
# per example (B * Hq * Lq * L <= 2 * 16 * 48 * 160); the GPU profile reaches several blocks of
# 128 keys and prefill lengths.
_SIZES = {
    "ci": Sizes(batch_sizes=(1, 2), kv_heads=(1, 2), max_q_len=48, max_kv_len=160, block_sizes=(16, 32, 64)),
    "gpu": Sizes(batch_sizes=(1, 2, 3, 4), kv_heads=(1, 2, 4, 8), max_q_len=128, max_kv_len=1100,
                 block_sizes=(16, 32, 64, 128, 256)),
}
_SIZES["dev"] = _SIZES["ci"]

# max_examples: "ci" about 10 s per kernel test on 2 CPU cores under the interpreter; "gpu"
# about a minute per test on an H100. deadline=None: the first call of a Triton kernel compiles
# it. too_slow: building the tensors of a problem counts as data generation.
_SETTINGS = {
    "ci": dict(max_examples=12, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]),
    "dev": dict(max_examples=60, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]),
    "gpu": dict(max_examples=300, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]),
}
PROFILES = tuple(_SETTINGS)


def profile_name() -> str:
    """The profile ``KVPASS_HYPOTHESIS_PROFILE`` asks for ("ci" when unset)."""
    name = os.environ.get(ENV_VAR, DEFAULT_PROFILE) or DEFAULT_PROFILE
    if name not in PROFILES and name != OFF:
        raise ValueError(f"{ENV_VAR}={name!r}: expected one of {PROFILES + (OFF,)}")
    return name


def default_sizes() -> Sizes:
    """The size bounds of the current profile (ci sizes when the profile is "off")."""
    return _SIZES.get(profile_name(), _SIZES[DEFAULT_PROFILE])


def register_profiles() -> None:
    """Register "kvpass-ci", "kvpass-dev" and "kvpass-gpu" with hypothesis."""
    for name, kwargs in _SETTINGS.items():
        settings.register_profile(f"kvpass-{name}", **kwargs)


def load_profile(name: str | None = None) -> str | None:
    """Register the profiles and load ``name`` (default: from the environment); returns the
    hypothesis profile loaded, or None for "off"."""
    name = profile_name() if name is None else name
    if name == OFF:
        return None
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: expected one of {PROFILES + (OFF,)}")
    register_profiles()
    settings.load_profile(f"kvpass-{name}")
    return f"kvpass-{name}"
