"""The strategies draw valid, reproducible problems with the promised structure."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kvpass.testing as kt
from kvpass.testing.oracles import logit_bias


def _visible(problem):
    """Keys each query attends: not -inf, nor finfo.min (the hiding value HF's additive masks use)."""
    bias = logit_bias(problem.attn_mask, problem.is_causal, problem.q_len, problem.kv_len)
    return (bias > torch.finfo(problem.dtype).min).expand(problem.batch, problem.q_heads, problem.q_len,
                                                          problem.kv_len)


@given(kt.attention_problems())
def test_drawn_problems_have_sdpa_shapes_and_dtypes(problem):
    p = problem
    assert p.q.shape == (p.batch, p.q_heads, p.q_len, p.head_dim)
    assert p.k.shape == p.v.shape == (p.batch, p.kv_heads, p.kv_len, p.head_dim)
    assert p.q_heads % p.kv_heads == 0
    assert p.q.dtype == p.k.dtype == p.v.dtype == p.dtype
    assert all(torch.isfinite(t).all() for t in (p.q, p.k, p.v))
    if p.attn_mask is not None:
        assert not p.is_causal  # torch SDPA forbids both
        assert p.attn_mask.dtype in (torch.bool, p.dtype)
        torch.broadcast_shapes(p.attn_mask.shape, (p.batch, p.q_heads, p.q_len, p.kv_len))
        assert not p.attn_mask.dtype.is_floating_point or not torch.isnan(p.attn_mask).any()


@given(kt.attention_problems())
def test_every_row_attends_a_key_unless_masked_rows_are_asked_for(problem):
    rows_with_key = _visible(problem).any(-1)
    if problem.distribution == "masked_rows":
        assert not rows_with_key.all()
    else:
        assert rows_with_key.all()


@given(kt.attention_problems(masks=("bool", "additive")))
def test_left_padding_hides_the_first_keys_of_each_sequence(problem):
    visible = _visible(problem)
    for b, pad in enumerate(problem.spec.left_pad):
        assert not visible[b, :, :, :pad].any()


@given(kt.attention_problems())
def test_repr_is_the_call_that_rebuilds_the_problem(problem):
    text = repr(problem)
    assert text.startswith("make_problem(") and "tensor" not in text
    again = eval(text, {"make_problem": kt.make_problem, "torch": torch})  # noqa: S307 (our own repr)
    for a, b in ((problem.q, again.q), (problem.k, again.k), (problem.v, again.v)):
        assert torch.equal(a, b)
    assert (problem.attn_mask is None) == (again.attn_mask is None)
    if problem.attn_mask is not None:
        assert torch.equal(problem.attn_mask, again.attn_mask)


@given(kt.decode_problems())
def test_decode_problems_have_one_to_four_queries(problem):
    assert 1 <= problem.q_len <= 4


@given(kt.prefill_problems(dtypes=(torch.float32,), head_dims=(64,)))
def test_prefill_problems_have_long_queries(problem):
    assert problem.q_len >= 16


@given(kt.attention_problems(gqa_ratios=("mqa",)))
def test_mqa_has_one_kv_head(problem):
    assert problem.kv_heads == 1 and problem.q_heads > 1


@given(st.sampled_from(sorted(kt.DISTRIBUTIONS)), st.integers(0, 2 ** 16))
def test_each_distribution_builds_at_every_dtype(name, seed):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        p = kt.make_problem(batch=1, q_heads=4, kv_heads=2, q_len=2, kv_len=33, head_dim=64, dtype=dtype,
                            mask="bool" if name == "masked_rows" else "none", distribution=name, seed=seed)
        assert all(torch.isfinite(t).all() for t in (p.q, p.k, p.v)), (name, dtype)
        assert torch.isfinite(kt.reference_attention(p)).all()


def test_one_dominant_key_takes_most_of_the_weight_of_a_single_query():
    p = kt.make_problem(batch=2, q_heads=2, kv_heads=2, q_len=1, kv_len=100, head_dim=64,
                        distribution="one_dominant_key", seed=3)
    _, probs = kt.reference_probs(p)
    # The gap is ln(L) + U(0, 6) above unit-variance logits: the top key gets about 40-99 %.
    assert (probs.amax(-1) > 0.3).all()


def test_equal_scores_give_the_mean_of_the_values():
    p = kt.make_problem(batch=1, q_heads=4, kv_heads=1, q_len=3, kv_len=50, head_dim=64,
                        distribution="equal_scores", seed=1)
    mean = p.v.to(torch.float64).mean(2, keepdim=True).expand(1, 4, 3, 64)
    torch.testing.assert_close(kt.reference_attention(p), mean, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_large_logits_reach_past_the_overflow_of_exp(dtype):
    # fp32 exp overflows at 88.7, fp16 at 11.1: a kernel without the max subtraction breaks.
    for seed in range(6):
        p = kt.make_problem(batch=1, q_heads=2, kv_heads=1, q_len=4, kv_len=64, head_dim=128, dtype=dtype,
                            distribution="large_logits", seed=seed)
        s = kt.reference_scores(p.q, p.k, scale=p.scale)
        assert s.abs().max() > 88.7
        assert torch.isfinite(s).all()


def test_outlier_channels_are_large_in_every_token():
    p = kt.make_problem(batch=1, q_heads=1, kv_heads=1, q_len=1, kv_len=64, head_dim=64,
                        distribution="outlier_channels", seed=0)
    channel_mean = p.k[0, 0].abs().mean(0)
    assert channel_mean.max() > 5 * channel_mean.median()


def test_zero_values_give_zero_output():
    p = kt.make_problem(batch=1, q_heads=2, kv_heads=1, q_len=2, kv_len=20, head_dim=64, distribution="zero_values")
    assert (kt.reference_attention(p) == 0).all()


@pytest.mark.parametrize("fields, message", [
    (dict(q_heads=3, kv_heads=2), "multiple of kv_heads"),
    (dict(mask="bool", causal=True), "causal=True takes no mask"),
    (dict(left_pad=(1,)), "need a mask"),
    (dict(mask="bool", left_pad=(8,)), "no key"),
    (dict(distribution="nope"), "distribution must be one of"),
    (dict(mask="sparse"), "mask must be one of"),
])
def test_invalid_specs_are_refused_with_the_allowed_values(fields, message):
    base = dict(batch=1, q_heads=2, kv_heads=1, q_len=1, kv_len=8, head_dim=16)
    with pytest.raises(ValueError, match=message):
        kt.make_problem(**{**base, **fields})


def test_strategy_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown distributions"):
        kt.attention_problems(distributions=("gaussian",))
    with pytest.raises(ValueError, match="masks must be"):
        kt.attention_problems(masks=("dense",))
    with pytest.raises(ValueError, match="masked rows need masks"):
        kt.attention_problems(masks=("none",), distributions=("masked_rows",))
