"""Early exit on fixed-capacity caches (``lowering/formats/fixed_early_exit.py``).

- the block summaries in the buffer after any sequence of writes equal the summaries built at once over the
  stored rows (as attention reads them), for every kv_bits;
- decode attention over the capacity (the op; the Triton kernel under the interpreter) is the exact attention
  over the blocks it read, and within the stated bound of the float64 attention over the stored tokens; with
  tol = 0 it reads every block holding a key of nonzero weight; blocks past the length are never read;
- its visiting plan over the capacity is the general path's over the length (the same order, suffix sums and
  blocks read), and the blocks counted in the site's stats are the general path's;
- the buffer's bytes are the scheme's layout plus the summaries'.

``BLOCK`` stays 64 (the spec's layout is cached per spec): a capacity of 256 is 4 blocks.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvpass.testing as kt
from kvpass.testing.oracles import logit_bias
from kvpass.testing.pytest_plugin import triton_interpreter_problem
from lowering import ops
from lowering.attention.early_exit import bound
from lowering.attention.early_exit.launcher import bounded_attention_triton
from lowering.core import packed, stats
from lowering.formats import fixed_capacity as fc
from lowering.formats import fixed_early_exit as fee

KV_BITS = (16, 8, "fp8", 4, "aligned")
CAPACITY = 256
TOLERANCES = (0.0, 1e-3, 1e-1, 0.5)
SITE = "layer0"
needs_interpreter = pytest.mark.skipif(
    triton_interpreter_problem() == "TRITON_INTERPRET is not set", reason="the kernel needs TRITON_INTERPRET=1")
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def spec_for(kv_bits, batch=1, kv_heads=2, dim=16, dtype=torch.float32, tol=1e-3):
    return fc.FixedCacheSpec(kv_bits=kv_bits, batch=batch, kv_heads=kv_heads, capacity=CAPACITY, k_dim=dim,
                             v_dim=dim, dtype=str(dtype), early_exit=tol)


def write(spec, buffer, k, v, start, n):
    positions = torch.arange(start, start + n)
    ops.fixed_cache_write(buffer, positions, k[:, :, start:start + n], v[:, :, start:start + n], spec.to_json())
    return positions


def stored(spec, buffer, length):
    """The first ``length`` positions as a decode step reads them: [B, Hkv, length, D] each."""
    one = torch.zeros(spec.batch, spec.kv_heads, 1, spec.k_dim, dtype=spec.torch_dtype)
    k, v = ops.fixed_cache_read(buffer, torch.tensor([length - 1]), one, one, spec.to_json())
    return k[:, :, :length], v[:, :, :length]


chunk_lists = st.lists(st.integers(1, 80), min_size=1, max_size=6).filter(lambda c: sum(c) <= CAPACITY)


@pytest.mark.parametrize("kv_bits", KV_BITS, ids=str)
@given(chunks=chunk_lists, batch=st.integers(1, 2), dim=st.sampled_from([8, 16, 15]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
@example(chunks=[31, 1, 1, 31, 1], batch=1, dim=16, dtype=torch.float32, seed=0)  # groups closed by decode steps
@example(chunks=[63, 1, 1], batch=2, dim=16, dtype=torch.bfloat16, seed=1)  # a block filled, the next opened
@example(chunks=[60, 80, 80, 36], batch=1, dim=8, dtype=torch.float32, seed=2)  # windows over 2-3 blocks, cache full
@settings(max_examples=25, deadline=None)
def test_summaries_after_writes_equal_summaries_built_at_once(kv_bits, chunks, batch, dim, dtype, seed):
    if kv_bits == "aligned" and dim % 2:
        dim += 1
    spec = spec_for(kv_bits, batch=batch, dim=dim, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    length = sum(chunks)
    k, v = ((torch.randn(batch, 2, length, dim, generator=g) * 3).to(dtype) for _ in range(2))
    buffer, start = fc.allocate(spec, "cpu"), 0
    for n in chunks:
        write(spec, buffer, k, v, start, n)
        start += n
        want = bound.build_summaries(*stored(spec, buffer, start))
        got = fee.summaries(buffer, spec)
        nb = bound.num_blocks(start)
        for name in bound.SECTIONS:
            assert torch.equal(got[name][:, :, :nb], want[name]), f"{name} after {start} of {chunks} tokens"


def peaked(problem, gap: float = 25.0):
    """Every key shrunk 20x but one per KV head, aligned with its group's mean query ``gap`` logits above the
    rest: attention concentrated enough for the bound to skip blocks."""
    p = problem
    B, Hkv, L, D = p.k.shape
    q_mean = p.q.double().reshape(B, Hkv, -1, D).mean(2)
    k = p.k.double() * 0.05
    k[:, :, (p.spec.seed * 7) % L] = gap / p.softmax_scale * q_mean / q_mean.square().sum(-1, keepdim=True).clamp_min(
        1e-12)
    return dataclasses.replace(p, k=k.to(p.dtype))


@dataclasses.dataclass
class Decode:
    """A cache written with a problem's keys and values (prefix, then the query's tokens) and its decode step."""

    problem: kt.AttentionProblem  # over the stored tokens (kv_len = the cache's length)
    spec: fc.FixedCacheSpec
    buffer: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor  # the model's, over the capacity


def decode(kv_bits, q_len, kv_len, batch, seed, tol, concentrated, mask="bool") -> Decode:
    p = kt.make_problem(batch=batch, q_heads=4, kv_heads=2, q_len=q_len, kv_len=kv_len, head_dim=16, mask=mask,
                        mask_causal=True, left_pad=tuple(min(70 * b, kv_len - q_len) for b in range(batch)),
                        seed=seed)
    p = peaked(p) if concentrated else p
    spec = spec_for(kv_bits, batch=batch, tol=tol)
    buffer = fc.allocate(spec, "cpu")
    if kv_len > q_len:
        write(spec, buffer, p.k, p.v, 0, kv_len - q_len)
    positions = write(spec, buffer, p.k, p.v, kv_len - q_len, q_len)
    hidden = False if p.attn_mask.dtype == torch.bool else torch.finfo(p.attn_mask.dtype).min
    mask = torch.nn.functional.pad(p.attn_mask, (0, CAPACITY - kv_len), value=hidden)
    k, v = stored(spec, buffer, kv_len)
    return Decode(dataclasses.replace(p, k=k, v=v), spec, buffer, positions, mask)


def plan_of(d: Decode):
    """The op's visiting plan, its mask and the capacity's keys and values (what the op attends over)."""
    mask = fee.held_mask(d.problem.q, d.mask, d.positions, CAPACITY)
    one = d.problem.k[:, :, -1:]
    k, v = ops.fixed_cache_read(d.buffer, d.positions[-1:], one, one, d.spec.to_json())
    written = d.positions[-1] + 1
    plan = bound.plan_visits(d.problem.q, fee.summaries(d.buffer, d.spec), CAPACITY, mask, d.problem.softmax_scale,
                             written)
    return plan, mask, k, v


def check_against_bound(out, p, read_blocks, tol):
    """(1) the exact attention over the blocks read, (2) full attention within the stated bound, (3) tol = 0
    reads every block holding a key of nonzero weight and nonzero value. ``read_blocks`` bool [B, Hkv, nb]."""
    kt.assert_all_written(out)
    keep = read_blocks.repeat_interleave(bound.BLOCK, -1)[..., :p.kv_len].repeat_interleave(p.group, 1)[:, :, None]
    if p.attn_mask.dtype == torch.bool:
        restricted = torch.isfinite(logit_bias(p.attn_mask, p.is_causal, p.q_len, p.kv_len, p.q.device)) & keep
    else:
        restricted = torch.where(keep, p.attn_mask, -math.inf).to(p.attn_mask.dtype)
    pr = dataclasses.replace(p, attn_mask=restricted)
    ref_read = kt.reference_attention(pr)
    tolerance = kt.tolerance_for(pr)
    kt.assert_attention_close(out, ref_read, tolerance, context=f"read set of {p!r}, tol={tol}")
    delta = tolerance.allowed(ref_read).norm(dim=-1, keepdim=True)
    ref = kt.reference_attention(p)
    assert kt.early_exit_bound_holds(out, ref, tol * (out.double().norm(dim=-1, keepdim=True) + delta) + delta), (
        f"{p!r} tol={tol}: row error {(out.double() - ref).norm(dim=-1).max().item():.3g}")
    if tol == 0:
        attended = (kt.reference_probs(p)[1] > 0) & (p.v != 0).any(-1).repeat_interleave(p.group, 1)[:, :, None]
        per_kv = attended.reshape(p.batch, p.kv_heads, -1, p.kv_len).any(2)
        nb = read_blocks.shape[-1]
        needed = torch.nn.functional.pad(per_kv, (0, nb * bound.BLOCK - p.kv_len)).view(*per_kv.shape[:2], nb, -1)
        assert not (needed.any(-1) & ~read_blocks).any(), f"tol=0 skipped an attended block of {p!r}"


decode_cases = dict(q_len=st.integers(1, 4), kv_len=st.integers(4, CAPACITY), batch=st.integers(1, 3),
                    seed=st.integers(0, 99), tol=st.sampled_from(TOLERANCES), concentrated=st.booleans(),
                    mask=st.sampled_from(["bool", "additive"]))


@pytest.mark.parametrize("kv_bits", KV_BITS, ids=str)
@given(**decode_cases)
@example(q_len=1, kv_len=65, batch=3, seed=0, tol=1e-3, concentrated=True, mask="bool")  # one token in a new block
@example(q_len=1, kv_len=CAPACITY, batch=1, seed=1, tol=0.0, concentrated=True, mask="additive")  # the cache full
@example(q_len=2, kv_len=160, batch=2, seed=2, tol=0.5, concentrated=True, mask="additive")  # int4: open group read
@settings(max_examples=25, deadline=None)
def test_decode_attention_is_within_the_bound_and_counts_blocks(kv_bits, q_len, kv_len, batch, seed, tol,
                                                                concentrated, mask):
    d = decode(kv_bits, q_len, kv_len, batch, seed, tol, concentrated, mask)
    p = d.problem
    stats.clear()
    out = ops.fixed_cache_early_exit_attention(p.q, d.buffer, d.positions, p.k[:, :, -q_len:], p.v[:, :, -q_len:],
                                               d.mask, False, None, d.spec.to_json(), SITE)
    plan, mask, k, v = plan_of(d)
    want, read = bound.bounded_attention_reference(p.q, k, v, plan, mask, p.softmax_scale, tol)
    assert torch.equal(out, want)
    counts = stats.snapshot()[SITE]
    assert counts == {"blocks_read": read.sum().item(), "blocks_total": batch * 2 * bound.num_blocks(kv_len)}
    read_blocks = bound.read_mask(plan, read)
    assert not read_blocks[..., bound.num_blocks(kv_len):].any(), "a block past the length was read"
    check_against_bound(out, p, read_blocks[..., :bound.num_blocks(kv_len)], tol)


@pytest.mark.parametrize("kv_bits", [16, 8], ids=str)
@given(**decode_cases)
@settings(max_examples=25, deadline=None)
def test_plan_over_the_capacity_is_the_general_paths_over_the_length(kv_bits, q_len, kv_len, batch, seed, tol,
                                                                     concentrated, mask):
    """Same order of the length's blocks, same suffix sums, same blocks read, same output (up to the rounding of
    fp32 products over more, hidden, keys): per-token schemes summarise the same rows."""
    d = decode(kv_bits, q_len, kv_len, batch, seed, tol, concentrated, mask)
    p = d.problem
    plan, mask_c, k, v = plan_of(d)
    nb = bound.num_blocks(kv_len)
    general = bound.plan_visits(p.q, bound.build_summaries(p.k, p.v), kv_len, p.attn_mask, p.softmax_scale)
    assert torch.equal(plan.order[..., :nb], general.order)
    # the bounds are fp32 matmuls over 4 blocks here and nb there: they may round differently by an ulp
    torch.testing.assert_close(plan.log_rest[..., :nb + 1], general.log_rest, atol=1e-5, rtol=1e-6)
    assert torch.equal(plan.v_rest[..., :nb + 1], general.v_rest)
    out, read = bound.bounded_attention_reference(p.q, k, v, plan, mask_c, p.softmax_scale, tol)
    want, want_read = bound.bounded_attention_reference(p.q, p.k, p.v, general, p.attn_mask, p.softmax_scale, tol)
    assert torch.equal(read, want_read)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("kv_bits,kv_len,tol", [(16, 130, 1e-3), (4, 70, 0.0), ("fp8", 200, 0.1)])
def test_kernel_over_the_capacity_is_within_the_bound(kv_bits, kv_len, tol):
    """The Triton kernel (CUDA's path; here interpreted) over the capacity with the op's plan and mask."""
    d = decode(kv_bits, 1, kv_len, 2, seed=kv_len, tol=tol, concentrated=True)
    p = d.problem
    plan, mask, k, v = plan_of(d)
    out, read = bounded_attention_triton(p.q, k, v, plan, mask, p.softmax_scale, tol)
    read_blocks = bound.read_mask(plan, read)
    assert not read_blocks[..., bound.num_blocks(kv_len):].any(), "a block past the length was read"
    check_against_bound(out, p, read_blocks[..., :bound.num_blocks(kv_len)], tol)


def test_concentrated_attention_skips_blocks():
    """The stop is not vacuous over the capacity: one dominant key lets it read fewer blocks than the length has."""
    d = decode(8, 1, 250, 2, seed=3, tol=1e-3, concentrated=True)
    p = d.problem
    stats.clear()
    ops.fixed_cache_early_exit_attention(p.q, d.buffer, d.positions, p.k[:, :, -1:], p.v[:, :, -1:], d.mask, False,
                                         None, d.spec.to_json(), SITE)
    counts = stats.snapshot()[SITE]
    assert 0 < counts["blocks_read"] < counts["blocks_total"] == 2 * 2 * 4, counts


@pytest.mark.parametrize("kv_bits", KV_BITS, ids=str)
def test_buffer_bytes_are_the_scheme_layout_plus_the_summaries(kv_bits):
    spec = spec_for(kv_bits, batch=2, dtype=torch.bfloat16)
    summaries = bound.summary_layout(2, 2, CAPACITY, 16, torch.bfloat16)
    assert spec.layout == {**spec.layout_at(spec.stored_length), **summaries}
    assert set(summaries).isdisjoint(spec.layout_at(spec.stored_length))
    buffer = fc.allocate(spec, "cpu")
    assert buffer.untyped_storage().nbytes() == packed.layout_nbytes(spec.layout) == spec.nbytes
    assert spec.nbytes == fc.allocate(dataclasses.replace(spec, early_exit=None), "cpu").numel() + sum(
        packed.section_nbytes(summaries).values())


@pytest.mark.parametrize("tol", [1.0, -1e-3, math.nan])
def test_spec_refuses_a_tolerance_out_of_range(tol):
    with pytest.raises(ValueError, match="early_exit"):
        spec_for(8, tol=tol)


def test_without_a_mask_the_positions_decide():
    """No mask from the model (SDPA's causal case at a decode step): each query sees the positions up to its own,
    as under the explicit causal mask over the capacity."""
    d = decode(8, 2, 100, 1, seed=4, tol=1e-3, concentrated=True)
    p = d.problem
    args = (p.q, d.buffer, d.positions, p.k[:, :, -2:], p.v[:, :, -2:])
    causal = fc.positional_mask(p.q, d.positions, CAPACITY)
    without = ops.fixed_cache_early_exit_attention(*args, None, False, None, d.spec.to_json(), SITE)
    explicit = ops.fixed_cache_early_exit_attention(*args, causal, False, None, d.spec.to_json(), SITE)
    assert torch.equal(without, explicit)


def test_positions_past_the_length_are_hidden_whatever_the_mask():
    """A mask that shows unwritten positions (additive zeros over the capacity) still attends the written ones
    only: the summaries hold no rows there, so the bound would not cover them."""
    d = decode(16, 1, 90, 1, seed=5, tol=0.0, concentrated=False)
    p = d.problem
    args = (p.q, d.buffer, d.positions, p.k[:, :, -1:], p.v[:, :, -1:])
    shows_all = torch.zeros(1, 1, 1, CAPACITY)
    out = ops.fixed_cache_early_exit_attention(*args, shows_all, False, None, d.spec.to_json(), SITE)
    ref = kt.reference_attention(p.q, p.k, p.v)  # the 90 written tokens, no mask
    kt.assert_attention_close(out, ref, kt.tolerance_for(dataclasses.replace(p, attn_mask=None)))
