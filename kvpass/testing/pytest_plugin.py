"""pytest plugin of kvpass.testing (entry point ``pytest11: kvpass_testing``).

At start-up, for the whole session:
- loads the hypothesis profile ``KVPASS_HYPOTHESIS_PROFILE`` names ("ci" by default; "off" leaves
  hypothesis alone, and an explicit ``--hypothesis-profile`` wins);
- sets ``TRITON_INTERPRET=1`` when no GPU is visible and the variable is unset, before test
  modules import (and so define) their Triton kernels; opt out by setting it to 0. This only
  helps if triton is not imported yet: loading this plugin imports ``kvpass``, which imports
  triton through torch._dynamo, so on a CPU export TRITON_INTERPRET=1 before pytest starts (the
  plugin warns when it is too late; ``triton_interpreter_problem`` says why);
- registers the ``requires_triton`` marker: such tests are skipped when triton is not installed.

Fixtures: ``kvpass_device`` (where problems run: KVPASS_TEST_DEVICE, else "cuda" when available,
else "cpu") and ``check_attention`` (``check_kernel`` bound to that device). Disable the plugin
with ``-p no:kvpass_testing``.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys

import pytest
import torch

from kvpass.testing import profiles
from kvpass.testing.checks import check_kernel
from kvpass.testing.strategies import default_device

PLUGIN_NAME = "kvpass_testing"


def _gpu_visible() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def triton_interpreter_problem() -> str | None:
    """Why Triton kernels cannot run under the CPU interpreter in this process, or None.

    ``@triton.jit`` decides at definition time, and triton's own library (``tl.cdiv``...) is
    defined when triton is imported: TRITON_INTERPRET=1 must be set before ``import triton``.
    """
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "TRITON_INTERPRET is not set"
    tl = sys.modules.get("triton.language")  # imported with triton; never imported here (triton is optional)
    if tl is not None:
        if type(tl.cdiv).__name__ != "InterpretedFunction":
            return ("triton was imported before TRITON_INTERPRET=1 was set (importing kvpass imports "
                    "torch._dynamo, which imports triton): export TRITON_INTERPRET=1 before starting pytest")
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_triton: skip the test when triton is not installed")
    if "TRITON_INTERPRET" not in os.environ and not _gpu_visible():
        os.environ["TRITON_INTERPRET"] = "1"
        problem = triton_interpreter_problem()
        if problem:
            config.issue_config_time_warning(pytest.PytestConfigWarning(f"kvpass.testing: {problem}"), stacklevel=2)
    explicit = config.getoption("hypothesis_profile", default=None) if hasattr(config, "getoption") else None
    if not explicit:
        profiles.load_profile()


def pytest_report_header(config):
    return (f"kvpass.testing: hypothesis profile {profiles.profile_name()!r}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("triton") is not None:
        return
    skip = pytest.mark.skip(reason="requires triton, which is not installed")
    for item in items:
        if item.get_closest_marker("requires_triton"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kvpass_device() -> str:
    """The device kernel tests run on: KVPASS_TEST_DEVICE, else CUDA when available, else CPU."""
    return os.environ.get("KVPASS_TEST_DEVICE") or default_device()


@pytest.fixture(scope="session")
def check_attention(kvpass_device):
    """``check_kernel`` with the problem moved to ``kvpass_device`` first."""
    return functools.partial(check_kernel, device=kvpass_device)
