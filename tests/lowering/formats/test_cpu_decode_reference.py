"""The host decode path of code * scale caches with unrotated rows (fp8, int8's rotation-free twin;
``lowering.formats.launch.attend_over_products``: scales folded into the scores and the weights)
against the float64 attention over the scheme's dequantized cache, on drawn decode problems (GQA, bool
and additive masks with fully masked rows, bf16/fp16/fp32, odd head dims). Rotated int8 rows take the
dequantize path (tests/lowering/storage/test_schemes.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import example, given, settings

import kvpass.testing as kt
from kvpass.testing import make_problem
from lowering.core.packed import allocate
from lowering.formats import launch
from lowering.storage import SCHEMES


def _packed(scheme, k, v):
    B, H, L, D = k.shape
    _, state = allocate(scheme.layout(B, H, L, D, v.shape[-1], k.dtype), "cpu")
    scheme.append(None, 0, k, v, state)
    return state


@pytest.mark.parametrize("key", ["8", "fp8"])
@settings(max_examples=25, deadline=None)
@given(problem=kt.decode_problems(head_dims=(16, 33, 64), causal=(False,)))
@example(problem=make_problem(batch=1, q_heads=9, kv_heads=3, q_len=1, kv_len=70, head_dim=64, mask="bool",
                              left_pad=(5,), dtype=torch.bfloat16, seed=3))  # SmolLM2's heads, bf16
def test_folded_scales_match_the_dequantized_oracle(key, problem):
    """Rows stored unrotated (the scheme's twin without rotation): the path is plain attention over code *
    scale in fp32, so the exact tolerance of the problem's dtype applies (it rounds only its output)."""
    scheme = SCHEMES[key].without_rotation()
    problem = problem.to("cpu")
    state = _packed(scheme, problem.k, problem.v)
    k, v = scheme.dequantize(state, problem.kv_len, torch.float32)

    def host(q, k, v, attn_mask=None, scale=None, is_causal=False):
        return launch.decode_attention(scheme, q, state, problem.kv_len, attn_mask, scale)

    kt.check_kernel(host, dataclasses.replace(problem, k=k, v=v))
