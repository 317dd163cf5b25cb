"""The float64 oracles agree with torch's SDPA and with each other."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import kvpass.testing as kt

F64 = torch.float64
# Two float64 computations of the same attention differ by rounding only: L-term sums of
# products of O(1)..O(1e37) values, 2^-53 each; 1e-10 relative to the largest value and score
# magnitude is far above that and far below any real error.
FLOAT64_RTOL = 1e-10


def _sdpa64(p):
    mask = p.attn_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(F64)
    return F.scaled_dot_product_attention(p.q.to(F64), p.k.to(F64), p.v.to(F64), attn_mask=mask,
                                          is_causal=p.is_causal, scale=p.scale, enable_gqa=True)


@given(kt.attention_problems(distributions=("normal", "masked_rows", "one_dominant_key", "outlier_channels")))
def test_reference_matches_torch_sdpa_in_float64(problem):
    ref = kt.reference_attention(problem)
    expected = _sdpa64(problem)
    scale = problem.v.to(F64).abs().max().item()
    torch.testing.assert_close(ref, expected, rtol=0, atol=FLOAT64_RTOL * max(scale, 1.0))


@given(kt.attention_problems(masks=("bool", "additive"), distributions=("masked_rows",)))
def test_rows_without_keys_give_zeros(problem):
    ref = kt.reference_attention(problem)
    _, probs = kt.reference_probs(problem)
    empty = probs.sum(-1) == 0
    assert empty.any()
    assert (ref[empty] == 0).all()
    assert torch.isfinite(ref).all()


@given(kt.attention_problems())
def test_reference_accepts_problem_or_tensors(problem):
    p = problem
    a = kt.reference_attention(p)
    b = kt.reference_attention(p.q, p.k, p.v, attn_mask=p.attn_mask, is_causal=p.is_causal, scale=p.scale)
    assert a.dtype == F64 and torch.equal(a, b)


@given(kt.attention_problems(), st.data())
def test_kept_set_attention_equals_attention_on_the_gathered_cache(problem, data):
    p = problem
    # A shared kept set of sorted, distinct positions (the mask's columns follow them).
    kept = sorted(data.draw(st.sets(st.integers(0, p.kv_len - 1), min_size=1, max_size=p.kv_len)))
    idx = torch.tensor(kept)
    out = kt.kept_set_attention(p, idx)
    bias = kt.logit_bias(p.attn_mask, p.is_causal, p.q_len, p.kv_len)[..., idx]
    expected = kt.reference_attention(p.q, p.k[:, :, idx], p.v[:, :, idx], attn_mask=bias, scale=p.scale)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@given(kt.attention_problems())
def test_keeping_every_token_is_plain_attention(problem):
    p = problem
    per_head = torch.arange(p.kv_len).expand(p.batch, p.kv_heads, p.kv_len)
    torch.testing.assert_close(kt.kept_set_attention(p, per_head), kt.reference_attention(p), rtol=0, atol=0)


def test_kept_set_per_head_uses_each_heads_own_tokens():
    p = kt.make_problem(batch=1, q_heads=4, kv_heads=2, q_len=1, kv_len=10, head_dim=16, seed=2)
    idx = torch.tensor([[[0, 3, 7], [1, 2, 9]]])
    out = kt.kept_set_attention(p, idx)
    for h_kv, kept in enumerate(idx[0]):
        expected = kt.reference_attention(p.q[:, 2 * h_kv:2 * h_kv + 2], p.k[:, h_kv:h_kv + 1, kept],
                                          p.v[:, h_kv:h_kv + 1, kept])
        torch.testing.assert_close(out[:, 2 * h_kv:2 * h_kv + 2], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        kt.kept_set_attention(p, torch.tensor([10]))


@given(kt.attention_problems())
def test_quantized_attention_with_identity_is_plain_attention(problem):
    torch.testing.assert_close(kt.quantized_attention(problem, None, lambda v: v.clone()),
                               kt.reference_attention(problem), rtol=0, atol=0)


def test_quantized_attention_attends_the_dequantized_values():
    p = kt.make_problem(batch=1, q_heads=2, kv_heads=1, q_len=2, kv_len=30, head_dim=32, seed=4)
    # Round to multiples of 1/4: a 3-bit-ish grid, quantize-dequantize in one step.
    qdq = lambda t: torch.round(t * 4) / 4  # noqa: E731
    out = kt.quantized_attention(p, qdq, qdq)
    expected = kt.reference_attention(p.q, qdq(p.k), qdq(p.v))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(out, kt.reference_attention(p))
    with pytest.raises(ValueError, match="quantize_k returned"):
        kt.quantized_attention(p, lambda k: k[:, :, :-1], None)


def test_early_exit_bound():
    ref = torch.zeros(1, 1, 2, 4, dtype=F64)
    out = torch.full((1, 1, 2, 4), 0.01)
    assert kt.early_exit_bound_holds(out, ref, 0.01)
    assert not kt.early_exit_bound_holds(out, ref, 0.009)
    row_bound = torch.tensor([0.02, 0.001], dtype=F64).view(1, 1, 2, 1)
    assert not kt.early_exit_bound_holds(out, ref, row_bound)
    nan = out.clone()
    nan[0, 0, 0, 0] = math.nan
    assert not kt.early_exit_bound_holds(nan, ref, math.inf)  # NaN never passes
    assert not kt.early_exit_bound_holds(out[..., :3], ref, 1.0)  # nor a wrong shape
