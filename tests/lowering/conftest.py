"""tests/lowering: Triton kernels run on the CPU under TRITON_INTERPRET=1 when no GPU is visible.

``@triton.jit`` decides between compiling and interpreting when a kernel is defined, so the
variable must be set before the kernel modules are imported: here, before the test modules load.
(The kvpass_testing plugin sets it too, but after importing triton; the kernels in
``lowering/attention`` use no triton library function that would then stay compiled.)
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # From a bare checkout (kvpass not installed) the plugin's entry point is not registered.
    from kvpass.testing import pytest_plugin

    if not config.pluginmanager.hasplugin(pytest_plugin.PLUGIN_NAME):
        config.pluginmanager.register(pytest_plugin, pytest_plugin.PLUGIN_NAME)
