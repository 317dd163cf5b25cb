"""Fault planting: a correct blocked attention passes the harness, and each planted fault fails it.

``blocked_attention`` is a small FlashAttention-style implementation in torch (a loop over key
blocks with an online softmax in fp32, probabilities rounded to the input dtype for the PV product,
as a kernel does), so "off-by-one in the block loop" is literal. Each fault test runs the
strategies with a fixed budget (derandomized, no database: the same examples on every run) and
expects the harness to report the fault.
"""
from __future__ import annotations

import math

import torch

FAULTS = ("skip_last_key", "skip_tail", "missing_mask", "scale_1_over_d", "scale_x1.05", "unwritten", "nan")


def blocked_attention(q, k, v, attn_mask=None, scale=None, is_causal=False, *, out=None, fault=None, block=16):
    """q [B, Hq, Lq, D], k/v [B, Hkv, L, D] -> [B, Hq, Lq, D] in q's dtype; ``fault`` plants one bug."""
    B, Hq, Lq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / D if fault == "scale_1_over_d" else 1.0 / math.sqrt(D)
    if fault == "scale_x1.05":
        scale *= 1.05
    qf = q.float()
    kf = k.float().repeat_interleave(Hq // Hkv, dim=1)
    vf = v.float().repeat_interleave(Hq // Hkv, dim=1)
    bias = None
    if attn_mask is not None and fault != "missing_mask":
        bias = attn_mask.float() if attn_mask.dtype != torch.bool else torch.zeros(
            attn_mask.shape, device=q.device).masked_fill(~attn_mask, -math.inf)
    if is_causal:
        causal = torch.zeros(Lq, L, device=q.device).masked_fill(
            torch.arange(L, device=q.device)[None, :] > torch.arange(Lq, device=q.device)[:, None], -math.inf)
        bias = causal if bias is None else bias + causal
    m = torch.full((B, Hq, Lq), -math.inf, device=q.device)
    row_sum = torch.zeros(B, Hq, Lq, device=q.device)
    acc = torch.zeros(B, Hq, Lq, D, device=q.device)
    end = (L // block) * block if fault == "skip_tail" else L
    for start in range(0, end, block):
        stop = min(start + block, L)
        if fault == "skip_last_key" and stop == L:
            stop = L - 1
        if stop == start:
            continue
        s = (qf @ kf[:, :, start:stop].transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias[..., start:stop]
        m_new = torch.maximum(m, s.amax(-1))
        # Rows with nothing attended yet keep m = -inf: shift them by 0 (the "nan" fault forgets).
        shift = m_new if fault == "nan" else torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - shift)
        p = torch.exp(s - shift[..., None])
        row_sum = row_sum * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p.to(v.dtype).float() @ vf[:, :, start:stop]
        m = m_new
    result = (acc / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)[..., None]).to(q.dtype)
    if out is None:
        return result
    if fault == "unwritten":
        result[-1, -1, -1, -1] = out[-1, -1, -1, -1]  # the last element is never stored
    out.copy_(result)
    return out


# ---------------------------------------------------------------------------------------------
# The harness, run as a user runs it: the default strategies and check_kernel.

import functools  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

import kvpass.testing as kt  # noqa: E402
from kvpass.testing.pytest_plugin import triton_interpreter_problem  # noqa: E402

# A fault must be reported within the same 40 examples on every run (derandomized, no database);
# the search stops at the first failure (no shrinking) except where a test looks at the shrunk
# example. Measured: each planted fault here fails within the first 10 examples.
FAULT_BUDGET = settings(max_examples=40, derandomize=True, database=None, deadline=None,
                        phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow])
EXPECTED_REPORT = {
    "skip_last_key": "exceed the tolerance",
    "skip_tail": "exceed the tolerance",
    "missing_mask": "exceed the tolerance",
    "scale_1_over_d": "exceed the tolerance",
    "scale_x1.05": "exceed the tolerance",
    "unwritten": r"1 of \d+ elements hold NaN/inf .* at \(\d+, \d+, \d+, 63\)",  # the very last element
    "nan": "hold NaN/inf",
}


def harness_report(kernel, strategy, budget=FAULT_BUDGET, **check_options) -> AssertionError | None:
    """Run ``check_kernel(kernel, problem)`` over ``strategy``; the failure it reports, or None."""
    @budget
    @given(strategy)
    def run(problem):
        kt.check_kernel(kernel, problem, **check_options)

    try:
        run()
    except AssertionError as failure:
        return failure
    return None


def falsifying_problem(failure: AssertionError) -> kt.AttentionProblem:
    """Rebuild the problem hypothesis printed for ``failure`` from its note alone."""
    notes = "\n".join(getattr(failure, "__notes__", []))
    call = re.search(r"problem=(make_problem\(.*\)),$", notes, re.MULTILINE)
    assert call, f"no falsifying example in the notes: {notes!r}"
    return eval(call.group(1), {"make_problem": kt.make_problem, "torch": torch})  # noqa: S307 (our repr)


@pytest.mark.parametrize("distribution", sorted(kt.DISTRIBUTIONS))
def test_correct_blocked_attention_passes(distribution, kvpass_device):
    # No false alarm, on each adversarial distribution, with the profile's budget.
    strategy = kt.attention_problems(distributions=(distribution,), device=kvpass_device)
    assert harness_report(blocked_attention, strategy, budget=settings(), out_arg=True) is None


@pytest.mark.parametrize("fault", FAULTS)
def test_planted_fault_is_reported_reproducibly(fault, kvpass_device):
    kernel = functools.partial(blocked_attention, fault=fault)
    failure = harness_report(kernel, kt.attention_problems(device=kvpass_device), out_arg=True)
    assert failure is not None, f"the harness missed the {fault} fault"
    assert re.search(EXPECTED_REPORT[fault], str(failure)), str(failure)
    # The printed example is enough to reproduce the failure.
    with pytest.raises(AssertionError, match=EXPECTED_REPORT[fault]):
        kt.check_kernel(kernel, falsifying_problem(failure), out_arg=True)


def test_failing_example_is_minimised():
    shrinking = settings(FAULT_BUDGET, phases=[Phase.generate, Phase.shrink])
    failure = harness_report(functools.partial(blocked_attention, fault="skip_tail"), kt.attention_problems(),
                             budget=shrinking)
    spec = falsifying_problem(failure).spec
    # The smallest problem with a ragged last block: fewer keys than one 16-key block, one of
    # everything else.
    assert spec.kv_len < 16 and spec.batch == 1 and spec.q_len == 1 and spec.kv_heads == 1, spec


# ---------------------------------------------------------------------------------------------
# The project's Triton decode kernel, under TRITON_INTERPRET=1 on the CPU (conftest.py sets it).

LAUNCHER_FAULTS = {
    # Off-by-one: the launcher is handed one key fewer than the cache holds.
    "truncated_kv": lambda f, q, k, v, attn_mask, scale, is_causal: f(
        q, k[:, :, :-1], v[:, :, :-1], None if attn_mask is None else attn_mask[..., :-1], scale, is_causal),
    "dropped_mask": lambda f, q, k, v, attn_mask, scale, is_causal: f(q, k, v, None, scale, is_causal),
    "scale_x1.05": lambda f, q, k, v, attn_mask, scale, is_causal: f(
        q, k, v, attn_mask, 1.05 * (1 / math.sqrt(q.shape[-1]) if scale is None else scale), is_causal),
}


@pytest.fixture(scope="module")
def decode_attention(kvpass_device):
    if kvpass_device == "cpu" and triton_interpreter_problem():
        pytest.skip(triton_interpreter_problem())
    return pytest.importorskip("lowering.attention.decode.launcher").decode_attention


@pytest.mark.requires_triton
def test_decode_kernel_passes(decode_attention, kvpass_device):
    assert harness_report(decode_attention, kt.decode_problems(device=kvpass_device), budget=settings(),
                          out_arg=True) is None


@pytest.mark.requires_triton
@pytest.mark.parametrize("fault", sorted(LAUNCHER_FAULTS))
def test_decode_kernel_fault_is_reported(decode_attention, kvpass_device, fault):
    def faulty(q, k, v, attn_mask=None, scale=None, is_causal=False):
        return LAUNCHER_FAULTS[fault](decode_attention, q, k, v, attn_mask, scale, is_causal)

    failure = harness_report(faulty, kt.decode_problems(device=kvpass_device))
    assert failure is not None, f"the harness missed the {fault} fault"
    assert "exceed the tolerance" in str(failure), str(failure)
