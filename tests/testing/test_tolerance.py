"""The tolerance model: sound (a correctly rounded result passes), not vacuous (real errors fail),
documented, and extensible through its registry."""
import dataclasses
import math

import pytest
import torch
from hypothesis import given

import kvpass.testing as kt
from kvpass.testing import tolerance as tolerance_module

F64 = torch.float64
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def test_lower_precision_gets_a_larger_tolerance():
    tols = [kt.attention_tolerance(dtype, 128, 1024) for dtype in DTYPES]
    assert tols[0].atol < tols[1].atol < tols[2].atol
    assert tols[0].rtol < tols[1].rtol < tols[2].rtol


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1.7e-3), (torch.float16, 3.8e-3),
                                         (torch.bfloat16, 1.7e-2)])
def test_docstring_numbers_hold(dtype, atol):
    # exact_tolerance's docstring quotes these for unit-normal data, max|v| = 4, D = 128, L = 1024.
    tol = kt.attention_tolerance(dtype, 128, 1024, value_bound=4.0, bf16_rounding="nearest")
    assert tol.atol == pytest.approx(atol, rel=0.05)
    assert "2^-8" in tolerance_module.exact_tolerance.__doc__


def test_interpreter_bf16_truncation_doubles_the_bf16_roundoff():
    nearest = kt.attention_tolerance(torch.bfloat16, 64, 64, bf16_rounding="nearest")
    truncate = kt.attention_tolerance(torch.bfloat16, 64, 64, bf16_rounding="truncate")
    assert truncate.rtol == 2 * nearest.rtol == 2.0 ** -7


def test_tf32_and_low_precision_scores_widen_the_fp32_bound():
    ieee = kt.attention_tolerance(torch.float32, 128, 512)
    assert kt.attention_tolerance(torch.float32, 128, 512, input_precision="tf32").atol > 5 * ieee.atol
    assert kt.attention_tolerance(torch.float16, 128, 512, score_dtype=torch.float16).atol > \
        kt.attention_tolerance(torch.float16, 128, 512).atol


@given(kt.attention_problems())
def test_correctly_rounded_output_passes(problem):
    # The float64 result rounded once to the dtype is what a perfect kernel returns.
    ref = kt.reference_attention(problem)
    kt.assert_attention_close(ref.to(problem.dtype), ref, kt.tolerance_for(problem))


@given(kt.attention_problems(distributions=("normal", "one_dominant_key", "outlier_channels")))
def test_an_error_twice_the_allowed_fails(problem):
    ref = kt.reference_attention(problem)
    tol = kt.tolerance_for(problem)
    out = ref.clone()
    where = (0, 0, 0, 0)
    out[where] += 2 * tol.allowed(ref)[where] + 1e-300
    with pytest.raises(AssertionError, match="exceed the tolerance"):
        kt.assert_attention_close(out, ref, tol)


@given(kt.attention_problems())
def test_per_problem_bound_is_within_the_size_only_bound(problem):
    p = problem
    per_element = kt.tolerance_for(p)
    scale = p.softmax_scale
    magnitude = scale * kt.oracles.grouped_matmul(p.q.to(F64).abs(), p.k.to(F64).abs().transpose(-1, -2))
    bias = kt.logit_bias(p.attn_mask, p.is_causal, p.q_len, p.kv_len)
    magnitude = magnitude + torch.where(torch.isfinite(bias), bias.abs(), torch.zeros_like(bias))
    sizes_only = kt.attention_tolerance(p.dtype, p.head_dim, p.kv_len, logit_bound=magnitude.max().item(),
                                        value_bound=p.v.to(F64).abs().max().item())
    assert per_element.rtol == sizes_only.rtol
    assert (per_element.atol <= sizes_only.atol * (1 + 1e-9)).all()


def test_a_single_attended_key_has_no_softmax_error():
    # One key: its weight is 1 whatever the score error; only the value's roundings remain.
    p = kt.make_problem(batch=1, q_heads=1, kv_heads=1, q_len=1, kv_len=1, head_dim=64, dtype=torch.float16,
                        distribution="large_logits", seed=2)
    tol = kt.tolerance_for(p, bf16_rounding="nearest")
    em = tolerance_module.error_model(torch.float16, 64, 1)
    expected = (em.pv + em.accumulate + em.subnormal + em.underflow) * p.v.to(F64).abs() + em.out_floor
    torch.testing.assert_close(tol.atol, expected, rtol=1e-12, atol=0)


def test_an_output_below_the_normal_range_may_round_to_zero():
    # Scores 200 and 0, the winner's value 0: the float64 output is e^-200 = 1.4e-87, which no fp32 kernel
    # can return (found by an aligned-cache problem with logits of ~1250 and an output element of 1e-68).
    p = kt.make_problem(batch=1, q_heads=1, kv_heads=1, q_len=1, kv_len=2, head_dim=16, seed=0)
    q = torch.zeros_like(p.q)
    q[..., 0] = 10.0
    k = torch.zeros_like(p.k)
    k[..., 0, 0] = 80.0  # score 0.25 * 10 * 80 = 200 against 0
    v = torch.zeros_like(p.v)
    v[..., 1, :] = 1.0
    p = dataclasses.replace(p, q=q, k=k, v=v)
    ref = kt.reference_attention(p)
    assert (ref > 0).all() and (ref < torch.finfo(torch.float32).tiny).all()
    kt.assert_attention_close(torch.zeros_like(ref).float(), ref, kt.tolerance_for(p))


def test_huge_well_separated_logits_keep_a_tight_bound():
    # Logits of ~1e36: the score error is ~1e31 in absolute terms, but the rows are one-hot with
    # gaps far larger, so the bound stays at the rounding of the chosen value.
    p = kt.make_problem(batch=1, q_heads=4, kv_heads=2, q_len=4, kv_len=100, head_dim=128, dtype=torch.float32,
                        distribution="large_logits", seed=3)
    assert kt.reference_scores(p.q, p.k).abs().max() > 1e30
    assert kt.tolerance_for(p).atol.median() < 1e-4


def test_nan_and_inf_never_pass():
    ref = torch.zeros(1, 1, 1, 4, dtype=F64)
    loose = kt.Tolerance(atol=math.inf, rtol=math.inf)
    for bad in (math.nan, math.inf, -math.inf):
        out = torch.zeros(1, 1, 1, 4)
        out[0, 0, 0, 2] = bad
        with pytest.raises(AssertionError, match="NaN/inf"):
            kt.assert_attention_close(out, ref, loose)


def test_sqnr_metric():
    ref = torch.ones(1, 1, 1, 100, dtype=F64)
    tol = kt.Tolerance(atol=0.0, rtol=0.0, metric="sqnr_db", min_sqnr_db=40.0)
    kt.assert_attention_close(ref + 0.001, ref, tol)  # 60 dB
    with pytest.raises(AssertionError, match="SQNR 20.00 dB < 40.0 dB"):
        kt.assert_attention_close(ref + 0.1, ref, tol)


def test_registry_adds_variants_and_names_the_known_ones():
    name = "test-only-quantized"

    @kt.register_tolerance(name)
    def quantized(dtype, head_dim, kv_len=None, *, bits=4):
        return kt.Tolerance(atol=0.0, rtol=0.0, metric="sqnr_db", min_sqnr_db=6.02 * bits, why=f"{bits}-bit")

    try:
        assert name in kt.registered_variants() and "exact" in kt.registered_variants()
        assert kt.attention_tolerance(torch.float16, 64, variant=name, bits=2).min_sqnr_db == pytest.approx(12.04)
        p = kt.make_problem(batch=1, q_heads=1, kv_heads=1, q_len=1, kv_len=4, head_dim=64)
        assert kt.tolerance_for(p, name).why == "4-bit"
        with pytest.raises(ValueError, match="already registered"):
            kt.register_tolerance(name)(quantized)
    finally:
        del tolerance_module._TOLERANCES[name]
    with pytest.raises(ValueError, match=r"no tolerance registered for variant 'nope'; registered: \('exact'"):
        kt.attention_tolerance(torch.float16, 64, variant="nope")


def test_bad_options_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"input_precision must be one of \('ieee', 'tf32'\)"):
        kt.attention_tolerance(torch.float32, 64, input_precision="tf32x3")
    with pytest.raises(ValueError, match="metric must be one of"):
        kt.Tolerance(atol=0.0, rtol=0.0, metric="ulp")
