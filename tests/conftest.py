import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/zoo.py


@pytest.fixture(autouse=True)
def fresh_compile_state():
    """Each test starts with no Dynamo cache (compiled code for one model's forward would otherwise be
    reused or count towards the recompile limit of the next) and an empty kvpass report."""
    import torch._dynamo

    import kvpass

    torch._dynamo.reset()
    kvpass.reset()
    yield
    torch._dynamo.reset()
