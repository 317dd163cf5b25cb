"""Fixed-capacity packed caches (``lowering/fixed_capacity.py``): the write op stores what the general path
stores, the read gives it back position by position, and decode attention over the whole capacity equals the
float64 attention over the stored tokens (the reference on the CPU, the Triton kernel under the interpreter)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvpass.testing as kt
from lowering import ops
from lowering.attention.decode import launcher as decode_launcher
from lowering.core import packed
from lowering.core.stats import calls
from lowering.formats import fixed_capacity as fc
from lowering.formats import launch
from lowering.formats.launch import kernel_decode_attention

KV_BITS = (16, 8, "fp8", 4, "aligned")
CAPACITY = 128


def spec_for(kv_bits, batch=1, kv_heads=2, dim=16, dtype=torch.float32, capacity=CAPACITY):
    return fc.FixedCacheSpec(kv_bits=kv_bits, batch=batch, kv_heads=kv_heads, capacity=capacity, k_dim=dim,
                             v_dim=dim, dtype=str(dtype))


def general_path(spec, k, v):
    """What the general packed path stores for these tokens, read back: [B, Hkv, L, D] each."""
    length = k.shape[2]
    state = packed.allocate(spec.layout_at(length), k.device)[1]
    spec.scheme.append(None, 0, k, v, state)
    return spec.scheme.dequantize(state, length, k.dtype)


def write_chunks(spec, k, v, chunks):
    """A zeroed buffer with k, v [B, Hkv, L, D] written chunk by chunk; the last chunk's positions."""
    buffer = fc.allocate(spec, k.device)
    start = 0
    for n in chunks:
        positions = torch.arange(start, start + n, device=k.device)
        ops.fixed_cache_write(buffer, positions, k[:, :, start:start + n], v[:, :, start:start + n], spec.to_json())
        start += n
    return buffer, positions


def stored(spec, buffer, length):
    """The cache's first ``length`` positions as a decode step reads them (no prefill overlay)."""
    one = torch.zeros(spec.batch, spec.kv_heads, 1, spec.k_dim, dtype=spec.torch_dtype, device=buffer.device)
    k, v = ops.fixed_cache_read(buffer, torch.tensor([length - 1], device=buffer.device), one, one, spec.to_json())
    return k[:, :, :length], v[:, :, :length]


chunk_lists = st.lists(st.integers(1, 40), min_size=1, max_size=6).filter(lambda c: sum(c) <= CAPACITY)


@pytest.mark.parametrize("kv_bits", KV_BITS, ids=str)
@given(chunks=chunk_lists, batch=st.integers(1, 2), dim=st.sampled_from([8, 16, 15]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
@example(chunks=[31, 1, 1], batch=1, dim=16, dtype=torch.float32, seed=0)  # a group filled by a decode step
@example(chunks=[32, 32, 33], batch=2, dim=16, dtype=torch.bfloat16, seed=1)  # group-aligned prefills, then one over
@example(chunks=[1] * 6, batch=1, dim=8, dtype=torch.float32, seed=2)
@settings(max_examples=15, deadline=None)
def test_write_stores_what_the_general_path_stores(kvpass_device, kv_bits, chunks, batch, dim, dtype, seed):
    if kv_bits == "aligned" and dim % 2:
        dim += 1
    spec = spec_for(kv_bits, batch=batch, dim=dim, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    length = sum(chunks)
    k, v = (torch.randn(batch, 2, length, dim, generator=g).to(dtype).to(kvpass_device) for _ in range(2))
    buffer = fc.allocate(spec, kvpass_device)
    start = 0
    for n in chunks:  # after every write, the stored prefix equals the general path's of the same tokens
        positions = torch.arange(start, start + n, device=kvpass_device)
        ops.fixed_cache_write(buffer, positions, k[:, :, start:start + n], v[:, :, start:start + n], spec.to_json())
        start += n
        got_k, got_v = stored(spec, buffer, start)
        want_k, want_v = general_path(spec, k[:, :, :start], v[:, :, :start])
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), f"after {start} of {chunks} tokens"


@pytest.mark.parametrize("kv_bits", KV_BITS, ids=str)
def test_prefill_read_gives_the_written_tokens_at_full_precision(kv_bits):
    """A prefill-length write is attended at full precision (as the general path's prefill): the read overlays
    it; earlier tokens are read as stored (int4: a group the write completed holds codes, where the general path,
    which dequantizes the old state before appending, would read its earlier tokens from the old residual)."""
    spec = spec_for(kv_bits)
    k, v = torch.randn(2, 1, 2, 40, 16).unbind(0)
    buffer, positions = write_chunks(spec, k, v, [5, 35])
    got_k, got_v = ops.fixed_cache_read(buffer, positions, k[:, :, 5:], v[:, :, 5:], spec.to_json())
    assert got_k.shape == (1, 2, CAPACITY, 16)
    assert torch.equal(got_k[:, :, 5:40], k[:, :, 5:]) and torch.equal(got_v[:, :, 5:40], v[:, :, 5:])
    want_k, want_v = (t[:, :, :5] for t in general_path(spec, k, v))
    assert torch.equal(got_k[:, :, :5], want_k) and torch.equal(got_v[:, :, :5], want_v)


def decode_problem(kv_bits, q_len, kv_len, batch, seed, dtype=torch.float32, device="cpu"):
    problem = kt.make_problem(batch=batch, q_heads=4, kv_heads=2, q_len=q_len, kv_len=kv_len, head_dim=16,
                              dtype=dtype, mask="bool", mask_causal=True,
                              left_pad=tuple(min(3 * b, kv_len - q_len) for b in range(batch)), seed=seed,
                              device=device)
    spec = spec_for(kv_bits, batch=batch, dtype=dtype)
    prefix = kv_len - q_len
    buffer, positions = write_chunks(spec, problem.k, problem.v, [n for n in (prefix, q_len) if n])
    # the model's mask spans the capacity (static-cache semantics): positions past the length are hidden
    mask = torch.nn.functional.pad(problem.attn_mask, (0, CAPACITY - kv_len), value=False)
    stored_k, stored_v = general_path(spec, problem.k, problem.v)
    return problem, spec, buffer, positions, mask, dataclasses.replace(problem, k=stored_k, v=stored_v)


@pytest.mark.parametrize("kv_bits", KV_BITS, ids=str)
@given(q_len=st.integers(1, 4), kv_len=st.integers(4, CAPACITY), batch=st.integers(1, 3), seed=st.integers(0, 99))
@example(q_len=1, kv_len=32, batch=1, seed=0)  # the write completes a group: attention reads it as codes
@example(q_len=1, kv_len=33, batch=3, seed=0)  # a one-token residual
@example(q_len=1, kv_len=CAPACITY, batch=1, seed=0)  # the cache full
@settings(max_examples=10, deadline=None)
def test_decode_attention_matches_the_float64_oracle(kvpass_device, kv_bits, q_len, kv_len, batch, seed):
    problem, spec, buffer, positions, mask, as_stored = decode_problem(kv_bits, q_len, kv_len, batch, seed,
                                                                       device=kvpass_device)
    out = ops.fixed_cache_attention(problem.q, buffer, positions, problem.k[:, :, -q_len:], problem.v[:, :, -q_len:],
                                   mask, False, None, spec.to_json())
    kt.assert_attention_close(out, kt.reference_attention(as_stored), kt.tolerance_for(as_stored),
                              context=f"kv_bits={kv_bits} {problem!r}")


@pytest.mark.parametrize("kv_bits", [8, "fp8", 4, "aligned"], ids=str)
@pytest.mark.parametrize("kv_len", [1, 31, 33, 100])
def test_decode_kernel_over_the_capacity_matches_the_float64_oracle(kvpass_device, kv_bits, kv_len):
    """The Triton kernel (CUDA's path; here under the interpreter) over the capacity's sections and the mask
    ``decode_operands`` builds (int4: open group's codes and the scratch group hidden, the residual rows after)."""
    if packed_kernel_unavailable(kvpass_device):
        pytest.skip("the kernel needs CUDA or TRITON_INTERPRET=1 on the CPU")
    problem, spec, buffer, positions, mask, as_stored = decode_problem(kv_bits, 1, kv_len, 2, seed=kv_len,
                                                                       device=kvpass_device)
    state, length, kernel_mask = fc.decode_operands(problem.q, buffer, positions, mask, spec)
    out = kernel_decode_attention(spec.scheme, problem.q, state, length, kernel_mask)
    kt.assert_attention_close(out, kt.reference_attention(as_stored), kt.tolerance_for(as_stored),
                              context=f"kv_bits={kv_bits} {problem!r}")


def packed_kernel_unavailable(device: str) -> bool:
    return not (str(device).startswith("cuda") or decode_launcher.INTERPRETED)


def test_int4_kernel_mask_hides_the_open_group_and_scratch():
    spec = spec_for(4)
    mask = torch.ones(1, 1, 1, CAPACITY, dtype=torch.bool)
    out = fc.kernel_mask(mask, torch.tensor([40]), spec)  # length 41: group 1 open with 9 rows
    assert out.shape[-1] == spec.stored_length
    codes, scratch, residual = out[..., :CAPACITY], out[..., CAPACITY:CAPACITY + 32], out[..., CAPACITY + 32:]
    assert codes[..., :32].all() and not codes[..., 32:64].any() and codes[..., 64:].all()
    assert not scratch.any()
    assert residual[..., :9].all() and not residual[..., 9:].any()


def test_spec_refuses_a_capacity_off_the_grid():
    with pytest.raises(ValueError, match="multiple of 64"):
        spec_for(8, capacity=100)


@pytest.mark.parametrize("kv_bits", KV_BITS, ids=str)
def test_buffer_bytes_are_the_layout_bytes(kv_bits):
    spec = spec_for(kv_bits)
    assert fc.allocate(spec, "cpu").untyped_storage().nbytes() == packed.layout_nbytes(spec.layout) == spec.nbytes


@pytest.mark.parametrize("kv_bits", [8, "fp8", 4, "aligned"], ids=str)
@pytest.mark.parametrize("kv_len", [40, 100])
def test_decode_kernel_over_the_capacity_equals_it_over_the_length_in_bf16(kvpass_device, kv_bits, kv_len):
    """bf16, D=64 (int8 / int4 score keys by their query splits there): the kernel over the capacity under the
    mask ``decode_operands`` builds gives what it gives over the general path's sections of the same tokens."""
    if packed_kernel_unavailable(kvpass_device):
        pytest.skip("the kernel needs CUDA or TRITON_INTERPRET=1 on the CPU")
    problem = kt.make_problem(batch=2, q_heads=8, kv_heads=2, q_len=1, kv_len=kv_len, head_dim=64,
                              dtype=torch.bfloat16, mask="bool", mask_causal=True, left_pad=(0, 5), seed=kv_len,
                              device=kvpass_device)
    spec = spec_for(kv_bits, batch=2, dim=64, dtype=torch.bfloat16)
    buffer, positions = write_chunks(spec, problem.k, problem.v, [kv_len - 1, 1])
    mask = torch.nn.functional.pad(problem.attn_mask, (0, CAPACITY - kv_len), value=False)
    state, length, kernel_mask = fc.decode_operands(problem.q, buffer, positions, mask, spec)
    out = kernel_decode_attention(spec.scheme, problem.q, state, length, kernel_mask)
    general = packed.allocate(spec.layout_at(kv_len), kvpass_device)[1]
    spec.scheme.append(None, 0, problem.k, problem.v, general)
    want = kernel_decode_attention(spec.scheme, problem.q, general, kv_len, problem.attn_mask)
    # the same tokens and kernel; only the split of the keys may differ (more of them over the capacity): at most
    # a bf16 rounding of the merged output apart (identical under the interpreter)
    torch.testing.assert_close(out, want, atol=2.0 ** -9, rtol=2.0 ** -7)


@given(length=st.integers(1, CAPACITY), q_len=st.integers(1, 3), shape=st.sampled_from(["full", "broadcast"]),
       dtype=st.sampled_from([torch.bool, torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
@example(length=32, q_len=1, shape="full", dtype=torch.bool, seed=0)  # a group just filled: no open rows
@example(length=CAPACITY, q_len=2, shape="broadcast", dtype=torch.bfloat16, seed=1)
@settings(max_examples=25, deadline=None)
def test_group_mask_kernel_builds_kernel_mask(kvpass_device, length, q_len, shape, dtype, seed):
    """The one-launch mask CUDA's int4 decode takes equals its torch twin ``kernel_mask`` element for element."""
    if packed_kernel_unavailable(kvpass_device):
        pytest.skip("the kernel needs CUDA or TRITON_INTERPRET=1 on the CPU")
    g = torch.Generator().manual_seed(seed)
    dims = (2, 3, q_len, CAPACITY) if shape == "full" else (2, 1, q_len, CAPACITY)
    mask = torch.rand(dims, generator=g) < 0.7
    if dtype != torch.bool:
        noise = (torch.rand(dims, generator=g) * 0.5).to(dtype)
        mask = torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype) + noise
    mask = mask.to(kvpass_device)
    if shape == "broadcast":
        mask = mask.expand(2, 3, q_len, CAPACITY)
    positions = torch.arange(length - q_len, length, device=kvpass_device).clamp(min=0)
    want = fc.kernel_mask(mask, positions, spec_for(4))
    got = decode_launcher.group_mask(mask, positions, 32)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


def test_a_fused_write_or_mask_kernel_that_fails_to_compile_leaves_it_to_the_torch_path():
    """``launch.compiled_or_none`` (around the fixed-capacity cache's CUDA kernels): a compile failure gives None,
    counted for the report, and the caller's torch path runs; any other error propagates."""
    class FakeCompileError(RuntimeError):
        pass

    FakeCompileError.__module__ = "triton.compiler.errors"  # what is_compile_failure recognises

    def fails_to_compile():
        raise FakeCompileError("PassManager::run failed")

    def fails_otherwise():
        raise ValueError("a bug, not a compile failure")

    assert launch.compiled_or_none("int4 decode write", fails_to_compile) is None
    assert any(key.startswith("int4 decode write: kernel failed to compile") for key in calls)
    assert launch.compiled_or_none("int4 decode write", lambda: True) is True
    with pytest.raises(ValueError, match="a bug"):
        launch.compiled_or_none("int4 decode write", fails_otherwise)
