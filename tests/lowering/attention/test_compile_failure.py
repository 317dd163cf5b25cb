"""A kernel that fails to compile for some constants falls back, never crashes
(``lowering/attention/compile_failure.py``): the decode launcher first drops the query's split (int4 / int8
keys) or fp8's fp16 MMAs, then raises ``KernelCompileError``, which exact attention and the packed caches' decode
turn into their torch reference. The failure is planted at the kernel's launch, as Triton raises it from a backend's
compiler pass (``RuntimeError: PassManager::run failed``)."""
from __future__ import annotations

import ast
import dataclasses

import pytest
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from kvpass.testing import make_problem
from lowering.attention import exact
from lowering.attention.compile_failure import is_compile_failure
from lowering.attention.decode import kernel as kernels
from lowering.attention.decode import launcher
from lowering.core.packed import allocate
from lowering.core.reference import exact_attention
from lowering.core.stats import calls
from lowering.formats import launch
from lowering.storage import SCHEMES

BACKEND_PASS = "/site-packages/triton/backends/nvidia/compiler.py"


def _raise_from(path: str, error: BaseException):
    """Raise ``error`` from a frame whose code lives at ``path`` (as a compiler pass's would)."""
    namespace: dict = {}
    exec(compile("def raise_it(error):\n    raise error\n", path, "exec"), namespace)
    namespace["raise_it"](error)


class PlantedFailure:
    """Stands for the split kernel: launches the real one, except where ``fails(constants)`` says the
    compiler breaks, counting those tries."""

    def __init__(self, fails):
        self.real, self.fails, self.tries = kernels.decode_attention_split_kernel, fails, 0

    def __getitem__(self, grid):
        def run(*args, **constants):
            if self.fails(constants):
                self.tries += 1
                _raise_from(BACKEND_PASS, RuntimeError("PassManager::run failed"))
            return self.real[grid](*args, **constants)

        return run


@pytest.fixture
def plant(monkeypatch):
    monkeypatch.setattr(launcher, "_FAILED", {})

    def plant_(fails):
        planted = PlantedFailure(fails)
        monkeypatch.setattr(kernels, "decode_attention_split_kernel", planted)
        return planted

    return plant_


def _int4_problem():
    # fp16 at D=64 with 4 query rows per KV head: the int4 scheme offers the query's split (bf16 goes to the
    # fragment kernel on CUDA, keys dequantized).
    p = make_problem(batch=1, q_heads=4, kv_heads=1, q_len=1, kv_len=40, head_dim=64, dtype=torch.float16,
                     mask="none", seed=3)
    scheme = SCHEMES["4"]
    _, state = allocate(scheme.layout(1, 1, p.kv_len, 64, 64, p.dtype), "cpu")
    scheme.append(None, 0, p.k, p.v, state)
    assert scheme.kernel_operands(p.q, state, p.kv_len).split_query
    return scheme, p, state


def test_compile_failures_are_told_from_other_errors():
    assert is_compile_failure(CompilationError(None, ast.Pass(), "planted"))
    for path, expected in ((BACKEND_PASS, True), ("/site-packages/triton/compiler/compiler.py", True),
                           ("/home/user/model.py", False)):
        with pytest.raises(RuntimeError) as info:
            _raise_from(path, RuntimeError("PassManager::run failed"))
        assert is_compile_failure(info.value) is expected, path
    assert not is_compile_failure(OutOfResources(300000, 232448, "shared memory"))


def _failing_twice(plant, scheme, p, state, config, constant: str, field: str):
    """Two launches of ``config`` whose ``constant`` fails to compile: (their outputs, the output of ``config`` with
    ``field`` off, the compiles tried)."""
    fallback = launch.kernel_decode_attention(scheme, p.q, state, p.kv_len, config=dataclasses.replace(
        config, **{field: False}))
    planted = plant(lambda constants: constants[constant])
    outs = [launch.kernel_decode_attention(scheme, p.q, state, p.kv_len, config=config) for _ in range(2)]
    return outs, fallback, planted.tries


@pytest.mark.requires_triton
def test_a_split_query_that_fails_to_compile_falls_back_to_the_unsplit_kernel(plant):
    scheme, p, state = _int4_problem()
    outs, unsplit, tries = _failing_twice(plant, scheme, p, state,
                                          launcher.DecodeAttentionConfig(block_n=32, num_warps=2), "SPLIT_QUERY",
                                          "split_query")
    assert all(torch.equal(out, unsplit) for out in outs)
    assert tries == 1 and len(launcher._FAILED) == 1  # remembered: the second call goes straight to the unsplit one


@pytest.mark.requires_triton
def test_fp8s_fp16_path_that_fails_to_compile_falls_back_to_converted_codes(plant):
    p = make_problem(batch=1, q_heads=4, kv_heads=1, q_len=1, kv_len=40, head_dim=64, dtype=torch.bfloat16,
                     mask="none", seed=4)
    scheme = SCHEMES["fp8"]
    _, state = allocate(scheme.layout(1, 1, p.kv_len, 64, 64, p.dtype), "cpu")
    scheme.append(None, 0, p.k, p.v, state)
    outs, converted, tries = _failing_twice(plant, scheme, p, state, launcher.DecodeAttentionConfig(block_n=32),
                                            "F16_CODES", "f16_codes")
    assert all(torch.equal(out, converted) for out in outs)
    assert tries == 1 and len(launcher._FAILED) == 1  # remembered: the second call goes straight to the codes


@pytest.mark.requires_triton
def test_a_kernel_that_never_compiles_leaves_packed_decode_to_the_reference(plant):
    scheme, p, state = _int4_problem()
    planted = plant(lambda constants: True)
    before = sum(n for key, n in calls.items() if "kernel failed to compile" in key)
    assert launch.kernel_attention_or_none(scheme, p.q, state, p.kv_len, None, None) is None
    assert sum(n for key, n in calls.items() if "kernel failed to compile" in key) == before + 1
    assert planted.tries == 2  # with the split, then without; then both are remembered
    assert launch.kernel_attention_or_none(scheme, p.q, state, p.kv_len, None, None) is None
    assert planted.tries == 2


@pytest.mark.requires_triton
def test_exact_attention_takes_sdpa_where_the_kernel_fails_to_compile(plant, monkeypatch):
    p = make_problem(batch=2, q_heads=4, kv_heads=2, q_len=1, kv_len=37, head_dim=64, dtype=torch.float16,
                     mask="none", seed=5)
    monkeypatch.setattr(exact, "kernel_reason", lambda *args: None)  # as on CUDA: the kernel would take them
    plant(lambda constants: True)
    out = exact.attention(p.q, p.k, p.v, None, False, None, True, True)
    assert torch.equal(out, exact_attention(p.q, p.k, p.v, None, False, None, True))
    assert any(key.startswith("torch_sdpa: kernel failed to compile") for key in calls)
