"""The fused int8 quantize-on-append kernel (Triton, interpreter on CPU) against ``quantize_rows``.

Exact equality is owed: the kernel computes the same fp32 operations (amax / 127, an IEEE division,
round half to even, clamp), so codes and scales must match bit for bit; rows outside the written range
keep their poison (NaN scales, code -128, which quantize_rows never produces).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowering.quantize_rows import append_rows
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
       kind=st.sampled_from(["normal", "zero_rows", "one_huge", "ties", "outlier_channel"]), seed=st.integers(0, 99))
def test_append_rows_matches_quantize_rows_exactly(batch, heads, new, dim, start, dtype, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = _data(kind, (batch, new, heads, dim), dtype, g).transpose(1, 2)  # [B, H, n, D] as HF hands it over
    rows = start + new + 2
    codes = torch.full((batch, heads, rows, dim), -128, dtype=torch.int8)
    scales = torch.full((batch, heads, rows), float("nan"))
    append_rows(x, codes[:, :, :start + new], scales[:, :, :start + new], start, QMAX)
    want_codes, want_scales = quantize_rows(x)
    assert torch.equal(codes[:, :, start:start + new].float(), want_codes)
    assert torch.equal(scales[:, :, start:start + new], want_scales)
    assert (codes[:, :, :start] == -128).all() and (codes[:, :, start + new:] == -128).all()
    assert scales[:, :, :start].isnan().all() and scales[:, :, start + new:].isnan().all()
