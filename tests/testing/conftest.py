"""Setup of the harness's own tests.

TRITON_INTERPRET must be set before triton is imported. When kvpass is installed, its pytest
plugin loads first and imports triton (through kvpass -> torch._dynamo), so on a CPU export
TRITON_INTERPRET=1 before pytest starts; this conftest sets it for a bare checkout, where nothing
has imported triton yet. The kvpass_testing plugin is registered by its entry point once kvpass
is installed; from a bare checkout it is registered here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    from kvpass.testing import pytest_plugin

    if not config.pluginmanager.hasplugin(pytest_plugin.PLUGIN_NAME):
        config.pluginmanager.register(pytest_plugin, pytest_plugin.PLUGIN_NAME)
