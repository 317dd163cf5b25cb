"""The fused int8 quantize-on-append kernel and the in-place decode step it serves (Triton, interpreter on CPU).

Exact equality is owed: the kernel computes the same fp32 operations (amax times fp32(1/127), an IEEE division,
round half to even, clamp), so codes and scales must match bit for bit; rows outside the written range
keep their poison (NaN scales, code -128, which quantize_rows never produces).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lowering.attention.append.launcher import append_rows
from lowering.core import packed
from lowering.core.rotation import rotates, store_rows
from lowering.formats import launch
from lowering.storage import SCHEMES
from lowering.storage.fp8 import E4M3_MAX, quantize_rows_fp8
from lowering.storage.int8 import QMAX, quantize_rows

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _data(kind: str, shape, dtype, g):
    x = torch.randn(shape, generator=g) * 3
    if kind == "zero_rows":
        x[..., ::2, :] = 0
    elif kind == "one_huge":
        x[..., 0, 1] = 6e4 if dtype == torch.float16 else 1e30
    elif kind == "ties":  # values at exact half steps of the row's scale: x / scale = k + 1/2
        x = (torch.randint(-100, 100, shape, generator=g).float() + 0.5)
        x[..., 0] = 127.0  # amax 127: scale 1, so every other element is a tie
    elif kind == "outlier_channel":
        x[..., 3 % shape[-1]] *= 1000
    return x.to(dtype)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), new=st.integers(1, 5), dim=st.sampled_from([8, 24, 64, 128]),
       start=st.integers(0, 9), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       kind=st.sampled_from(["normal", "zero_rows", "one_huge", "ties", "outlier_channel"]), seed=st.integers(0, 99),
       rotated=st.booleans())
def test_append_rows_matches_quantize_rows_exactly(batch, heads, new, dim, start, dtype, kind, seed, rotated,
                                                   kvpass_device):
    """Rotated rows too: the kernel's butterfly is the host's, stage for stage, so the bits still agree."""
    assume(not rotated or rotates(dim))
    g = torch.Generator().manual_seed(seed)
    x = _data(kind, (batch, new, heads, dim), dtype, g).transpose(1, 2)  # [B, H, n, D] as HF hands it over
    rows = start + new + 2
    codes = torch.full((batch, heads, rows, dim), -128, dtype=torch.int8)
    scales = torch.full((batch, heads, rows), float("nan"))
    x_dev, codes_dev, scales_dev = (t.to(kvpass_device) for t in (x, codes, scales))
    append_rows(x_dev, codes_dev[:, :, :start + new], scales_dev[:, :, :start + new], start, QMAX, rotated)
    codes, scales = codes_dev.cpu(), scales_dev.cpu()
    want_codes, want_scales = quantize_rows(store_rows(x) if rotated else x)
    assert torch.equal(codes[:, :, start:start + new].float(), want_codes)
    assert torch.equal(scales[:, :, start:start + new], want_scales)
    assert (codes[:, :, :start] == -128).all() and (codes[:, :, start + new:] == -128).all()
    assert scales[:, :, :start].isnan().all() and scales[:, :, start + new:].isnan().all()


@settings(max_examples=12, deadline=None)
@given(old_length=st.integers(1, 70), heads=st.sampled_from([(4, 2), (2, 2), (8, 1)]), masked=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
@pytest.mark.parametrize("kv_bits", ["8", "fp8", "4"])
def test_decode_in_place_equals_the_general_path(kv_bits, old_length, heads, masked, dtype, seed, kvpass_device):
    """The schemes' decode step on capacity sections (the op's CUDA fast path: int8's fused append, int4's
    residual rows) against the general path (append into trimmed views, then the same kernel): the same
    bytes in the buffer, the same output; int4 declines (None) a step that completes a key group."""
    scheme, (hq, hkv), d, b = SCHEMES[kv_bits], heads, 16, 2
    g = torch.Generator().manual_seed(seed)
    k0, v0 = (torch.randn(b, hkv, old_length, d, generator=g).to(dtype) for _ in range(2))
    k1, v1 = (torch.randn(b, 1, hkv, d, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    q = torch.randn(b, 1, hq, d, generator=g).to(dtype).transpose(1, 2)
    length = old_length + 1
    assume(packed.capacity(old_length) >= length)  # the op takes this path only while the buffer has room
    mask = None
    if masked:  # HF's decode mask [B, 1, 1, L] with left padding in the first row
        mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
        mask[0, ..., : old_length // 2] = False
    k0, v0, k1, v1, q = (t.to(kvpass_device) for t in (k0, v0, k1, v1, q))
    mask = None if mask is None else mask.to(kvpass_device)
    layout_of = lambda n: scheme.layout(b, hkv, n, d, d, dtype)  # noqa: E731
    cap_layout = packed.capacity_layout(layout_of, packed.capacity(old_length))
    buffer, cap = packed.allocate(cap_layout, kvpass_device)
    buffer.fill_(0)
    scheme.append(None, 0, k0, v0, packed.trimmed(cap, layout_of(old_length)))
    other = buffer.clone()
    # general path
    out_state = packed.trimmed(cap, layout_of(length))
    scheme.append(packed.trimmed(cap, layout_of(old_length)), old_length, k1, v1, out_state)
    want = launch.kernel_decode_attention(scheme, q, out_state, length, mask, None)
    # fast path on the other copy
    other_cap = packed.views(other, cap_layout)
    got = launch.decode_in_place(scheme, q, other_cap, old_length, k1, v1, mask, None)
    if kv_bits == "4" and length % scheme.group == 0:
        assert got is None  # the group fills: quantizing it is the general path's
        return
    assert got is not None and torch.equal(got, want)
    assert torch.equal(other, buffer)


@settings(max_examples=15, deadline=None)
@given(new=st.integers(1, 5), start=st.integers(0, 40), blocked=st.booleans(), rotated=st.booleans(),
       seed=st.integers(0, 99))
def test_append_rows_at_a_device_start_writes_what_an_int_start_writes(new, start, blocked, rotated, seed,
                                                                       kvpass_device):
    """A fixed-capacity cache passes its write position as a device tensor: the kernel reads it there."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, new, 16, generator=g).to(torch.bfloat16).to(kvpass_device)
    shape = (2, 3, 48 // 16, 16, 16) if blocked else (2, 3, 48, 16)
    results = []
    for at in (start, torch.tensor([start, start + 99], device=kvpass_device)):
        codes = torch.full(shape, -128, dtype=torch.int8, device=kvpass_device)
        scales = torch.full((2, 3, 48), float("nan"), device=kvpass_device)
        append_rows(x, codes, scales, at, QMAX, rotated, blocked)
        results.append((codes, scales))
    (want_codes, want_scales), (codes, scales) = results
    assert torch.equal(codes, want_codes) and torch.equal(scales.nan_to_num(-1.0), want_scales.nan_to_num(-1.0))
    assert (want_codes != -128).any()


@settings(max_examples=15, deadline=None)
@given(new=st.integers(1, 5), start=st.integers(0, 40), fp8=st.booleans(), seed=st.integers(0, 99))
def test_append_into_token_blocks_zeroes_the_rest_of_the_last_block(new, start, fp8, seed, kvpass_device):
    """Token-blocked codes: the program of the last new row zeroes its block past that row (the decode kernel reads
    whole blocks, and fp8 bytes there could be NaN: ``token_blocks.clear_tail``); nothing before ``start`` moves, nor
    any later block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, new, 16, generator=g).to(torch.bfloat16).to(kvpass_device)
    raw = torch.full((2, 3, 48 // 16, 16, 16), 0x7F, dtype=torch.uint8, device=kvpass_device)  # e4m3 NaN poison
    codes = raw.view(torch.float8_e4m3fn) if fp8 else raw.view(torch.int8)
    scales = torch.zeros(2, 3, 48, device=kvpass_device)
    append_rows(x, codes, scales, start, E4M3_MAX if fp8 else QMAX, False, True)
    tokens = raw.transpose(-1, -2).reshape(2, 3, 48, 16)  # token-major copy: [B, H, token, D]
    end = start + new
    assert (tokens[:, :, :start] == 0x7F).all(), "a byte before start moved"
    block_end = -(-end // 16) * 16
    assert not tokens[:, :, end:block_end].any(), "bytes past the last row in its block are not zero"
    assert (tokens[:, :, block_end:] == 0x7F).all(), "a later block moved"


@settings(max_examples=20, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.sampled_from([8, 24, 64])),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       kind=st.sampled_from(["normal", "zero_rows", "one_huge", "ties", "outlier_channel"]), seed=st.integers(0, 99))
def test_int8_rows_by_the_kernel_are_the_torch_paths(shape, dtype, kind, seed, kvpass_device):
    """ADORE's cold-store rows (``launch.int8_rows``): the append kernel's codes and scales, bit for bit."""
    x = _data(kind, shape, dtype, torch.Generator().manual_seed(seed)).to(kvpass_device)
    codes, scales = quantize_rows(x)
    got = launch.int8_rows_by_kernel(x)
    assert got is not None, "the append kernel refused the rows"
    assert got[0].dtype == torch.int8 and torch.equal(got[0], codes.to(torch.int8)) and torch.equal(got[1], scales)


def _fp8_data(kind: str, shape, dtype, g):
    """Rows for the e4m3 path: with their largest |x| at 448 (scale 1), ``midpoints`` puts elements halfway
    between neighbouring e4m3 values (ties, also across a power of two) and ``subnormal`` below 2^-6."""
    x = torch.randn(shape, generator=g) * 3
    if kind in ("midpoints", "subnormal"):
        codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        finite = codes[codes.isfinite() & (codes.abs() <= 448)].sort().values
        mids = (finite[1:] + finite[:-1]) / 2
        pool = mids if kind == "midpoints" else mids[mids.abs() < 2.0 ** -6]
        x = pool[torch.randint(len(pool), shape, generator=g)]
        x[..., 0] = 448.0  # scale 1: x / scale = x, the midpoints stay midpoints
    elif kind == "zero_rows":
        x[..., ::2, :] = 0
    elif kind == "negative_zero":
        x[..., 1::2] = -0.0
    return x.to(dtype)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), new=st.integers(1, 5), dim=st.sampled_from([8, 24, 64, 128]),
       start=st.integers(0, 9), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       kind=st.sampled_from(["normal", "midpoints", "subnormal", "zero_rows", "negative_zero"]),
       seed=st.integers(0, 99), device_start=st.booleans())
def test_append_rows_fp8_matches_quantize_rows_fp8_exactly(batch, heads, new, dim, start, dtype, kind, seed,
                                                           device_start, kvpass_device):
    """e4m3 codes bit for bit as torch's conversion (ties to even, subnormals, -0), scales as its fp32 division."""
    assume(not (kind in ("midpoints", "subnormal") and dtype != torch.float32))  # midpoints need fp32's bits
    g = torch.Generator().manual_seed(seed)
    x = _fp8_data(kind, (batch, new, heads, dim), dtype, g).transpose(1, 2)
    rows = start + new + 2
    codes = torch.full((batch, heads, rows, dim), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)  # NaN poison
    scales = torch.full((batch, heads, rows), float("nan"))
    x_dev, codes_dev, scales_dev = (t.to(kvpass_device) for t in (x, codes, scales))
    at = torch.tensor([start], device=kvpass_device) if device_start else start
    append_rows(x_dev, codes_dev, scales_dev, at, E4M3_MAX)
    codes, scales = codes_dev.cpu().view(torch.uint8), scales_dev.cpu()
    want_codes, want_scales = quantize_rows_fp8(x)
    assert torch.equal(codes[:, :, start:start + new], want_codes.view(torch.uint8))
    assert torch.equal(scales[:, :, start:start + new], want_scales)
    assert (codes[:, :, :start] == 0x7F).all() and (codes[:, :, start + new:] == 0x7F).all()
