"""Poisoned buffers, written-element checks and check_kernel's contract checks, with messages that
say what and where."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import kvpass.testing as kt

PROBLEM = dict(batch=2, q_heads=4, kv_heads=2, q_len=3, kv_len=40, head_dim=64, dtype=torch.float16, seed=7)


def sdpa(q, k, v, attn_mask=None, scale=None, is_causal=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, is_causal=is_causal,
                                          enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.uint8])
def test_poisoned_buffer_fails_the_written_check_until_fully_written(dtype):
    buf = kt.poisoned_like(torch.empty(2, 3, dtype=dtype))
    with pytest.raises(AssertionError, match="6 of 6 elements"):
        kt.assert_all_written(buf)
    buf[:, :2] = 1
    with pytest.raises(AssertionError, match=r"2 of 6 elements .* at \(0, 2\), \(1, 2\)"):
        kt.assert_all_written(buf)
    buf[:, 2] = 0
    kt.assert_all_written(buf)


def test_failure_message_names_shape_dtype_errors_and_where():
    p = kt.make_problem(**PROBLEM)
    ref = kt.reference_attention(p)
    out = ref.to(p.dtype)
    out[1, 2, 0, 5] += 0.25
    with pytest.raises(AssertionError) as info:
        kt.assert_attention_close(out, ref, kt.tolerance_for(p))
    text = str(info.value)
    for part in ("[2, 4, 3, 64] torch.float16", "1 of 1536 elements (1 of 24 rows)", "at (1, 2, 0, 5)",
                 "max abs error 0.25", "max relative error", "worst error/allowed", "tolerance: exact attention"):
        assert part in text, part


def test_shape_mismatch_is_reported():
    with pytest.raises(AssertionError, match=r"shape \[1, 1, 1, 3\] != reference \[1, 1, 1, 4\]"):
        kt.assert_attention_close(torch.zeros(1, 1, 1, 3), torch.zeros(1, 1, 1, 4, dtype=torch.float64),
                                  kt.Tolerance(atol=1.0, rtol=0.0))


def test_check_kernel_passes_torch_sdpa_and_returns_its_output():
    p = kt.make_problem(**PROBLEM, mask="bool", left_pad=(0, 5))
    out = kt.check_kernel(sdpa, p)
    assert out.shape == p.q.shape and out.dtype == p.dtype


def test_check_kernel_catches_a_kernel_that_writes_its_inputs():
    def scribbles(q, k, v, **kw):
        out = sdpa(q, k, v, **kw)
        k.mul_(1.0)
        k[0, 0, 0, 0] += 1
        return out

    with pytest.raises(AssertionError, match="modified its input k"):
        kt.check_kernel(scribbles, kt.make_problem(**PROBLEM))


def test_check_kernel_catches_a_wrong_output_dtype():
    with pytest.raises(AssertionError, match=r"returned \[2, 4, 3, 64\] torch.float32, expected .* torch.float16"):
        kt.check_kernel(lambda q, k, v, **kw: sdpa(q, k, v, **kw).float(), kt.make_problem(**PROBLEM))


def test_check_kernel_poisons_out_and_names_the_problem():
    def forgets_a_row(q, k, v, *, out, **kw):
        out[:, :, :-1] = sdpa(q, k, v, **kw)[:, :, :-1]

    with pytest.raises(AssertionError) as info:
        kt.check_kernel(forgets_a_row, kt.make_problem(**PROBLEM), out_arg=True)
    text = str(info.value)
    assert "kernel forgets_a_row on make_problem(batch=2" in text
    assert "512 of 1536 elements hold NaN/inf" in text


def test_check_kernel_rejects_an_out_kernel_returning_another_tensor():
    with pytest.raises(AssertionError, match="returned another tensor"):
        kt.check_kernel(lambda q, k, v, *, out, **kw: sdpa(q, k, v, **kw), kt.make_problem(**PROBLEM), out_arg=True)


def test_check_kernel_takes_a_variant_reference_and_tolerance():
    p = kt.make_problem(**PROBLEM)
    kept = torch.arange(0, p.kv_len, 2)
    compressed = lambda q, k, v, **kw: sdpa(q, k[:, :, kept], v[:, :, kept], **kw)  # noqa: E731
    tol = kt.tolerance_for(p)  # the exact bound on the full problem, here only an illustration
    kt.check_kernel(compressed, p, reference=kt.kept_set_attention(p, kept), tolerance=tol)
    with pytest.raises(AssertionError, match="exceed the tolerance"):
        kt.check_kernel(compressed, p)


def test_nan_output_is_reported_before_closeness():
    def nan_kernel(q, k, v, **kw):
        out = sdpa(q, k, v, **kw)
        out[0, 0, 0, 0] = math.nan
        return out

    with pytest.raises(AssertionError, match=r"1 of 1536 elements hold NaN/inf .* at \(0, 0, 0, 0\)"):
        kt.check_kernel(nan_kernel, kt.make_problem(**PROBLEM))


@given(data=st.data())
def test_torch_sdpa_passes_on_the_test_device(kvpass_device, data):
    # A production kernel as a no-false-alarm check. On CUDA, SDPA with GQA and a mask may run its
    # math backend, which scales q and k in the input dtype and stores fp16/bf16 scores: hence
    # score_dtype (the CPU kernels compute scores in fp32 and need no option). Rows with no key
    # only on the CPU: torch 2.11's CUDA SDPA returned 2.16, not 0, for one (fp16, bool mask,
    # make_problem(batch=1, q_heads=1, kv_heads=1, q_len=1, kv_len=2, head_dim=64,
    # dtype=torch.float16, mask='bool', distribution='masked_rows'), H100).
    names = [n for n in kt.DISTRIBUTIONS if kvpass_device == "cpu" or n != "masked_rows"]
    problem = data.draw(kt.attention_problems(device=kvpass_device, distributions=names))
    kt.check_kernel(sdpa, problem, score_dtype=problem.dtype)
