"""Fused decode scoring kernels of the budgeted caches (``lowering.attention.scored``).

- ``score_keys``: per-KV-head weights (and the raw scores) against float64, over key segments in the
  model's dtype and int8 rows with per-row scales (ADORE's cold store), candidates in any position order
  (the mask read at each one's logical position), GQA 1/2/4, fp32/fp16/bf16, Lq 1-4, masks with left
  padding, adversarial data (one dominant key, outlier channels, equal scores, fully masked rows), into
  NaN-poisoned buffers;
- ``kept_attention``: float64 attention over any kept subset, within the exact-attention tolerance of
  ``kvpass.testing`` for that subset, into a poisoned buffer;
- wiring: h2o and adore with the kernels forced on (the spec's ``fused_scoring``) keep the same tokens as
  the reference path and attend over them within the tolerance; the fused path really ran.
Triton kernels run under TRITON_INTERPRET=1 on the CPU (tests/lowering/conftest.py).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_policies import decode_sequence, fmt_for  # tests/lowering/formats: the same sequences

import kvpass.testing as kt
from kvpass.testing.oracles import F64, grouped_matmul, logit_bias
from kvpass.testing.tolerance import _bf16_truncates
from lowering.attention.scored import launcher as sda
from lowering.core import packed
from lowering.core.limits import MASKED_BELOW
from lowering.core.operands import KeySegment
from lowering.formats import budgeted
from lowering.storage.int8 import dequantize_rows, quantize_rows

U32 = 2.0 ** -24


def problems():
    return kt.decode_problems(gqa_ratios=(1, 2, 4), head_dims=(16, 40, 64), kv_heads=(1, 2), causal=(False,),
                              device="auto",
                              distributions=("normal", "one_dominant_key", "outlier_channels", "equal_scores",
                                             "masked_rows"))


def segment_keys(problem, cuts, int8_segment):
    """Key segments over the problem's keys (cut at ``cuts``), one of them int8 rows with scales, and the
    keys as the kernel sees them (int8 ones dequantized as lowering.storage.int8.dequantize_rows)."""
    p = problem
    bounds = [0, *cuts, p.kv_len]
    segments, seen = [], []
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        k = p.k[:, :, lo:hi]
        if s == int8_segment:
            codes, scale = quantize_rows(k)
            codes = codes.to(torch.int8)
            segments.append(KeySegment(codes, scale))
            seen.append(dequantize_rows(codes, scale, p.dtype))
        else:
            segments.append(KeySegment(k))
            seen.append(k)
    return segments, torch.cat(seen, 2)


def oracle_scores(problem, k, pos):
    """Float64 scores [B, Hq, Lq, C] of candidates with keys ``k`` at logical positions ``pos`` [B, Hkv, C]
    (mask read there, entries below -1e4 not attended), and the score error bound of an fp32 kernel."""
    p = problem
    B, Hq, Lq, C = p.batch, p.q_heads, p.q_len, k.shape[2]
    bias = logit_bias(p.attn_mask, False, Lq, p.kv_len, p.device).expand(B, Hq, Lq, p.kv_len)
    bias = bias.gather(-1, pos.repeat_interleave(p.group, 1)[:, :, None, :].expand(B, Hq, Lq, C))
    bias = bias.masked_fill(bias < MASKED_BELOW, -math.inf)
    s = grouped_matmul(p.q.to(F64), k.to(F64).transpose(-1, -2)) * p.softmax_scale + bias
    magnitude = p.softmax_scale * grouped_matmul(p.q.to(F64).abs(), k.to(F64).abs().transpose(-1, -2))
    # fp32 dot of D exactly-multiplied terms + scale + bias add: (D + 4) u32 (kvpass.testing.tolerance,
    # point 1). Triton's interpreter truncates the int8 dequantization to bf16 where torch rounds: keys
    # differ by up to 2^-7 relative, so the score by 2^-7 scale sum|q||k| (bf16 only, interpreter only).
    rel = (p.head_dim + 4) * U32 + (2.0 ** -7 if p.dtype == torch.bfloat16 and _bf16_truncates() else 0.0)
    delta = rel * (magnitude + torch.where(torch.isfinite(bias), bias.abs(), 0.0))
    return s, torch.where(torch.isfinite(s), delta, 0.0)


def weights_bound(s, delta, group, q_len, mean):
    """Float64 weights [B, Hkv, C] and their error bound. Row r: p_rj = exp(s_rj - lse_r); the kernel's
    lse errs by at most max_j delta_rj plus its fp32 sum of C exps with a rescale per block and the split
    merge, (2C + 16) u32; so p' = p e^x with |x| <= delta_rj + that + 4 u32 (exp, subtraction): |p' - p|
    <= p expm1(|x|). Summing G Lq rows (and dividing by Lq) in fp32: (G Lq + 2) u32 of the sum. fp32 exps
    of scores ~88 below the row max flush to 0: 2^-126 absolute each."""
    B, Hq, Lq, C = s.shape
    top = s.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    e = torch.exp(s - top)
    total = e.sum(-1, keepdim=True)
    probs = e / torch.where(total == 0, 1.0, total)
    x = delta + delta.amax(-1, keepdim=True) + (2 * C + 20) * U32
    err = probs * torch.expm1(x) + torch.isfinite(s) * 2.0 ** -126
    to_kv = lambda t: t.reshape(B, Hq // group, group * Lq, C).sum(2) / (Lq if mean else 1)  # noqa: E731
    w = to_kv(probs)
    return w, to_kv(err) + (group * Lq + 2) * U32 * w


@settings(deadline=None)
@given(problem=problems(), data=st.data())
def test_score_keys_gives_the_float64_weights_over_segments_and_candidate_positions(problem, data):
    p = problem
    n_cuts = data.draw(st.integers(0, min(2, p.kv_len - 1)))
    cuts = sorted(data.draw(st.lists(st.integers(1, p.kv_len - 1), min_size=n_cuts, max_size=n_cuts,
                                     unique=True))) if n_cuts else []
    int8_segment = data.draw(st.sampled_from([-1, *range(n_cuts + 1)]))
    segments, k_seen = segment_keys(p, cuts, int8_segment)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    pos = torch.stack([torch.randperm(p.kv_len, generator=g) for _ in range(p.batch * p.kv_heads)]).to(p.device)
    pos = pos.reshape(p.batch, p.kv_heads, p.kv_len) if data.draw(st.booleans()) else \
        torch.arange(p.kv_len, device=p.device).expand(p.batch, p.kv_heads, p.kv_len).contiguous()
    mean = data.draw(st.booleans())
    w_out = kt.poisoned_like(torch.empty(p.batch, p.kv_heads, p.kv_len, device=p.device))
    s_out = kt.poisoned_like(torch.empty(p.batch, p.q_heads, p.q_len, p.kv_len, device=p.device))
    before = p.q.clone(), p.k.clone()
    scored = sda.score_keys(p.q, segments, pos.to(torch.int32), p.attn_mask, p.scale, p.kv_len, mean=mean,
                            weights_out=w_out, scores_out=s_out)
    assert scored.weights is w_out and torch.equal(p.q, before[0]) and torch.equal(p.k, before[1])
    kt.assert_all_written(w_out, "weights")
    s_ref, delta = oracle_scores(p, k_seen, pos)
    # scores: -inf exactly where not attended (so every element was written: NaN never equals), else close
    assert torch.equal(torch.isinf(s_out), torch.isinf(s_ref)), f"attended set differs on {p!r}"
    finite = torch.isfinite(s_ref)
    err = (s_out.double() - s_ref).abs()[finite]
    assert (err <= delta[finite] + 1e-30).all(), f"scores off by {err.max().item():.3g} on {p!r}"
    w_ref, bound = weights_bound(s_ref, delta, p.group, p.q_len, mean)
    kt.assert_attention_close(w_out, w_ref, kt.Tolerance(atol=bound, rtol=0.0, why=weights_bound.__doc__),
                              context=repr(p))


@settings(deadline=None)
@given(problem=problems(), data=st.data())
def test_kept_attention_attends_over_the_kept_subset_from_the_stored_scores(problem, data):
    p = problem
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    kept = data.draw(st.integers(1, p.kv_len))
    idx = torch.stack([torch.randperm(p.kv_len, generator=g)[:kept] for _ in range(p.batch * p.kv_heads)])
    idx = idx.reshape(p.batch, p.kv_heads, kept).to(p.device)
    pos = torch.arange(p.kv_len, device=p.device).expand(p.batch, p.kv_heads, p.kv_len)
    scored = sda.score_keys(p.q, [KeySegment(p.k)], pos, p.attn_mask, p.scale, p.kv_len)
    take = lambda t: t.gather(2, idx[..., None].expand(*idx.shape, t.shape[-1]))  # noqa: E731
    out = kt.poisoned_like(torch.empty(p.q.shape, dtype=p.dtype, device=p.device))
    got = sda.kept_attention(scored, idx.to(torch.int32), take(p.v), out=out)
    assert got is out
    kt.assert_all_written(out)
    # float64 attention over the kept keys, their mask gathered, "not attended" below -1e4 (a kept set
    # may lose a row's every attended key: output 0, as lowering.formats.budgeted's masks say)
    B, Hq, Lq = p.batch, p.q_heads, p.q_len
    bias = logit_bias(p.attn_mask, False, Lq, p.kv_len, p.device).expand(B, Hq, Lq, p.kv_len)
    bias = bias.gather(-1, idx.repeat_interleave(p.group, 1)[:, :, None, :].expand(B, Hq, Lq, kept))
    bias = bias.masked_fill(bias < MASKED_BELOW, -math.inf)
    spec = dataclasses.replace(p.spec, kv_len=kept, left_pad=(), mask_causal=False)
    sub = dataclasses.replace(p, k=take(p.k), v=take(p.v), attn_mask=bias, spec=spec)
    kt.assert_attention_close(out, kt.reference_attention(sub), kt.tolerance_for(sub), context=repr(p))


def test_launchers_refuse_what_the_kernels_do_not_take():
    device = kt.default_device()
    q = torch.randn(1, 4, 1, 16, device=device)
    k = torch.randn(1, 2, 8, 16, device=device)
    pos = torch.arange(8, device=device).expand(1, 2, 8)
    with pytest.raises(ValueError, match="int8 codes"):
        sda.score_keys(q, [KeySegment(k, torch.ones(1, 2, 8, device=device))], pos, None, None, 8)
    with pytest.raises(ValueError, match="query length"):
        sda.score_keys(torch.randn(1, 4, 17, 16, device=device), [KeySegment(k)], pos, None, None, 8)
    with pytest.raises(ValueError, match="pos"):
        sda.score_keys(q, [KeySegment(k)], pos[..., :7], None, None, 8)


# ------------------------------------------------------------------------------------------ wiring

def run_policy(policy, fused, monkeypatch, seed, group, budget):
    """Prefill 20 tokens (row 1 left-padded by 5), then 4 decode steps; per step (out, sections)."""
    device = kt.default_device()  # CUDA: compiled kernels; CPU: the interpreter (tests/lowering/conftest.py)
    q, k, v, calls = decode_sequence(group=group, seed=seed, prompt=20, steps=4, pads=(0, 5))
    q, k, v = q.to(device), k.to(device), v.to(device)
    calls = [(lo, hi, mask.to(device)) for lo, hi, mask in calls]
    fmt, old, outs, states = fmt_for(policy, budget, fused_scoring=fused), None, [], []
    for lo, hi, mask in calls:  # test_policies.run_sequence, on the test device
        B, Hkv, _, D = k.shape
        _, sections = packed.allocate(fmt.layout(B, Hkv, hi, D, D, q.dtype), device)
        for t in sections.values():
            t.copy_(kt.poisoned_like(t))
        out = fmt.step(q[:, :, lo:hi], old, lo, k[:, :, lo:hi], v[:, :, lo:hi], mask, False, None, "site", sections)
        kt.assert_all_written(out, "attention output")
        for name, t in sections.items():
            kt.assert_all_written(t, f"section {name}")
        outs.append(out)
        states.append(sections)
        old = sections
    return q, k, v, calls, outs, states


@pytest.mark.parametrize("policy, group", [("h2o", 4), ("adore", 2)])  # GQA ratios: the kernel tests above
def test_fused_decode_keeps_the_reference_tokens_and_attends_over_them(policy, group, monkeypatch):
    """Fixed seeds, fp32 data: the scores of both paths differ by rounding (~1e-7) and the selection
    margins of these sequences are far wider, so the kept sets must be identical."""
    calls_made = []
    real = sda.kept_attention
    monkeypatch.setattr(sda, "kept_attention", lambda *a, **kw: calls_made.append(1) or real(*a, **kw))
    ref = run_policy(policy, False, monkeypatch, seed=3, group=group, budget=12)
    assert not calls_made
    q, k, v, calls, outs, states = run_policy(policy, True, monkeypatch, seed=3, group=group, budget=12)
    assert len(calls_made) == len(calls) - 1, "every decode step past the budget takes the fused path"
    for (lo, hi, mask), out, s, ref_s in zip(calls[1:], outs[1:], states[1:], ref[5][1:]):
        for name in s:
            assert torch.equal(s[name], ref_s[name]) or (name.endswith("score") and torch.allclose(
                s[name], ref_s[name], rtol=1e-5, atol=1e-7)), f"{policy}: section {name} differs at L={hi}"
        pos = s["pos"].long()
        problem = kt.make_problem(batch=2, q_heads=q.shape[1], kv_heads=k.shape[1], q_len=1, kv_len=pos.shape[-1],
                                  head_dim=k.shape[-1])
        sub = dataclasses.replace(problem, q=q[:, :, lo:hi], k=s["k"], v=s["v"],
                                  attn_mask=budgeted.gather_model_mask(mask, pos, q.shape[1], 1, hi))
        kt.assert_attention_close(out, kt.reference_attention(sub), kt.tolerance_for(sub), context=f"{policy} L={hi}")
