"""The fused int4 decode write (``lowering/attention/append/int4_kernel.py``; Triton, the interpreter on the CPU)
stores, at every position attention reads, what the fixed-capacity torch path (``fixed_capacity.write``) stores:
bit for bit, since both compute the same float64 operations (min, max, (max - min) / 15 rounded up to the dtype,
IEEE division, round half to even, clamp); and what attention reads back lies within the scheme's error bound of
the float64 tokens."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lowering.attention.append.launcher import append_int4_decode
from lowering.core import packed
from lowering.formats import fixed_capacity as fc
from lowering.storage import token_blocks
from lowering.storage.int4 import GROUP, Int4Kivi

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CAPACITY = 128


def _data(kind: str, shape, dtype, g):
    x = torch.randn(shape, generator=g) * 3
    if kind == "constant_rows":  # a row's range 0: scale 0, every code 0
        x[..., ::3, :] = 1.5
    elif kind == "ties":  # halves of small integers: (x - min) / scale lands on .5 for many elements
        x = torch.randint(-30, 30, shape, generator=g).float() / 2
    elif kind == "outlier_channel":
        x[..., 3 % shape[-1]] *= 1000
    elif kind == "huge":  # near the dtype's largest finite values (fp16: 65504), none past them
        x = (x * (6e3 if dtype == torch.float16 else 1e30)).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    return x.to(dtype)


def _sections(spec, buffer):
    return packed.views(buffer, spec.layout)


def _written(spec, buffer, length):
    """What attention reads of the first ``length`` tokens: the full groups' key codes, scales and minima, the
    values' codes (unblocked), scales and minima of every token, and the open group's residual rows."""
    s, full = _sections(spec, buffer), length // GROUP * GROUP
    values = token_blocks.read_rows(s["v"], length, Int4Kivi.VALUE_SLOTS)
    return {"k": s["k"][:, :, :full], "k_scale": s["k_scale"][:, :, :full // GROUP],
            "k_min": s["k_min"][:, :, :full // GROUP], "v": values[:, :, :full], "v_scale": s["v_scale"][:, :, :full],
            "v_min": s["v_min"][:, :, :full], "k_res": s["k_res"][:, :, :length - full],
            "v_res": s["v_res"][:, :, :length - full]}


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), dim=st.sampled_from([8, 15, 64, 128]),
       prompt=st.integers(0, 70), steps=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       kind=st.sampled_from(["normal", "constant_rows", "ties", "outlier_channel", "huge"]), seed=st.integers(0, 99))
@example(batch=1, heads=1, dim=8, prompt=0, steps=33, dtype=torch.bfloat16, kind="normal", seed=0)  # from empty
@example(batch=2, heads=2, dim=15, prompt=31, steps=1, dtype=torch.float16, kind="ties", seed=1)  # one step fills
def test_kernel_writes_what_the_torch_path_writes(batch, heads, dim, prompt, steps, dtype, kind, seed, kvpass_device):
    steps = min(steps, CAPACITY - prompt)
    spec = fc.FixedCacheSpec(kv_bits=4, batch=batch, kv_heads=heads, capacity=CAPACITY, k_dim=dim, v_dim=dim,
                             dtype=str(dtype))
    g = torch.Generator().manual_seed(seed)
    k, v = (_data(kind, (batch, heads, prompt + steps, dim), dtype, g).to(kvpass_device) for _ in range(2))
    torch_path, kernel_path = fc.allocate(spec, kvpass_device), fc.allocate(spec, kvpass_device)
    if prompt:
        for buffer in (torch_path, kernel_path):
            fc.write(buffer, torch.arange(prompt, device=kvpass_device), k[:, :, :prompt], v[:, :, :prompt], spec)
    slots = token_blocks.slot_index(Int4Kivi.VALUE_SLOTS, torch.device(kvpass_device))
    for t in range(prompt, prompt + steps):
        position = torch.tensor([t], device=kvpass_device)
        new_k, new_v = k[:, :, t:t + 1], v[:, :, t:t + 1]
        fc.write(torch_path, position, new_k, new_v, spec)
        append_int4_decode(position, new_k, new_v, _sections(spec, kernel_path), slots, GROUP, token_blocks.TOKENS)
        want, got = _written(spec, torch_path, t + 1), _written(spec, kernel_path, t + 1)
        for name in want:
            assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), \
                f"{name} after token {t} ({kind}, {dtype}, D={dim})"
    # and against float64: what attention reads of the kernel's cache lies within the scheme's stated error of
    # the tokens written (the open group's rows exact)
    length = prompt + steps
    one = k[:, :, -1:]
    read_k, read_v = fc.read(kernel_path, torch.tensor([length - 1], device=kvpass_device), one, one, spec)
    general = packed.allocate(spec.layout_at(length), kvpass_device)[1]
    spec.scheme.append(None, 0, k, v, general)
    bound_k, bound_v = spec.scheme.error_bound(general, length, dtype)
    for name, x, read, bound in (("keys", k, read_k, bound_k), ("values", v, read_v, bound_v)):
        error = (read[:, :, :length].double() - x.double()).abs()
        assert (error <= bound).all(), f"{name}: {(error - bound).max().item()} over the bound ({kind}, {dtype})"
