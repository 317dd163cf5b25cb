"""Every spelling of attention the patterns claim is found, rewritten and still exact; attention that
can't be rewritten safely is left to torch with the reason in the report.

Tolerance: a rewritten site is checked against float64 attention over the same float32 inputs within
kvpass.testing's exact-attention bound (a worst case for fp32 arithmetic in any summation order); a site left
to torch runs torch's own ops, so it is compared with the eager call at 1e-5 relative / 1e-6 absolute.
Inputs come from a seed hypothesis draws, so a failure reproduces.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvpass
import kvpass.testing as kt

ATOL, RTOL = 1e-6, 1e-5
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def compiled(fn):
    return torch.compile(fn, backend="kvpass", options={"compiler": "eager"}, dynamic=False)


def repeat_kv(x, n):  # transformers' repeat_kv: expand + reshape
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def make_mask(kind, b, hq, lq, lk, broadcast_heads, g=None):
    if kind == "none":
        return None
    keep = torch.rand(b, 1 if broadcast_heads else hq, lq, lk, generator=g) > 0.3
    keep[..., -1] = True  # every query row keeps at least one key
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


@st.composite
def sdpa_calls(draw):
    b, hkv = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    n_rep = draw(st.sampled_from([1, 2, 4]))
    lq, lk, d = draw(st.sampled_from([1, 3])), draw(st.integers(1, 20)), draw(st.sampled_from([8, 16]))
    return dict(
        shapes=(b, hkv, n_rep, lq, max(lk, lq), d),
        mask=draw(st.sampled_from(["none", "bool", "additive"])),
        broadcast_heads=draw(st.booleans()),
        causal=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.3])),
        gqa=draw(st.sampled_from(["enable_gqa", "repeat_kv", "repeat_interleave"])),
        keywords=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def assert_exact(out, q, k, v, mask, is_causal=False, scale=None):
    """out within the exact-attention bound of float64 attention over the same inputs (module docstring)."""
    ref = kt.reference_attention(q, k, v, mask, is_causal, scale)
    tolerance = kt.attention_tolerance(torch.float32, q.shape[-1], k.shape[2], value_bound=v.abs().max().item())
    kt.assert_attention_close(out, ref, tolerance)


@FAST
@given(sdpa_calls())
def test_sdpa_forms_rewritten_and_exact(call):
    b, hkv, n_rep, lq, lk, d = call["shapes"]
    g = torch.Generator().manual_seed(call["seed"])
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h, n in ((hkv * n_rep, lq), (hkv, lk), (hkv, lk)))
    mask = make_mask(call["mask"], b, hkv * n_rep, lq, lk, call["broadcast_heads"], g)
    causal = call["causal"] and mask is None  # torch refuses both at once

    def attend(q, k, v, mask):
        if call["gqa"] == "repeat_kv":
            k, v, gqa = repeat_kv(k, n_rep), repeat_kv(v, n_rep), False
        elif call["gqa"] == "repeat_interleave":
            k, v, gqa = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1), False
        else:
            gqa = n_rep > 1
        if call["keywords"]:
            return F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask, is_causal=causal,
                                                  scale=call["scale"], enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale=call["scale"], enable_gqa=gqa)

    torch._dynamo.reset()
    kvpass.reset()
    out = compiled(attend)(q, k, v, mask)
    assert_exact(out, q, k, v, mask, causal, call["scale"])
    sites = kvpass.report().sites
    assert [s.status for s in sites] == ["rewritten"], str(kvpass.report())
    if call["gqa"] == "repeat_kv" and n_rep > 1:
        assert "GQA expansion x%d stripped" % n_rep in sites[0].reason


@FAST
@given(st.sampled_from(["mul", "rmul", "div", "none"]), st.booleans(), st.sampled_from(["to", "type", "none"]),
       st.booleans(), st.integers(1, 12), st.integers(0, 2**16))
def test_hand_written_attention_rewritten_and_exact(scaling, with_mask, cast, with_dropout, lk, seed):
    d = 16
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, n, d, generator=g) for n in (3, lk, lk))
    mask = make_mask("additive", 2, 4, 3, lk, broadcast_heads=True, g=g) if with_mask else None

    def attend(q, k, v, mask):
        w = torch.matmul(q, k.transpose(-1, -2))
        if scaling == "mul":
            w = w * (1 / math.sqrt(d))
        elif scaling == "rmul":
            w = (1 / math.sqrt(d)) * w
        elif scaling == "div":
            w = w / math.sqrt(d)
        if mask is not None:
            w = w + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32)
        w = w.to(q.dtype) if cast == "to" else w.type(v.dtype) if cast == "type" else w
        if with_dropout:
            w = F.dropout(w, p=0.1, training=False)
        return torch.matmul(w, v)

    torch._dynamo.reset()
    kvpass.reset()
    out = compiled(attend)(q, k, v, mask)
    assert_exact(out, q, k, v, mask, scale=1.0 if scaling == "none" else 1 / math.sqrt(d))
    assert [(s.pattern, s.status) for s in kvpass.report().sites] == [("matmul_softmax", "rewritten")]


def _left_alone(fn, *args, reason):
    out = compiled(fn)(*args)
    sites = kvpass.report().sites
    assert [s.status for s in sites] == ["left"], str(kvpass.report())
    assert reason in sites[0].reason, sites[0].reason
    return out


def test_training_dropout_left_to_torch():
    q = torch.randn(1, 2, 3, 8)
    _left_alone(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.1), q, reason="dropout")


def test_attention_weights_read_elsewhere_left_and_exact():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)

    def attend_and_return_weights(q, k, v):  # output_attentions=True
        w = torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1)
        return w @ v, w

    out, w = _left_alone(attend_and_return_weights, q, k, v, reason="read elsewhere")
    ref_out, ref_w = attend_and_return_weights(q, k, v)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(w, ref_w, atol=ATOL, rtol=RTOL)


def test_unknown_op_before_softmax_left_and_exact():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)

    def softcapped(q, k, v):  # Gemma-2 style logit soft-capping: not SDPA
        w = torch.matmul(q, k.transpose(2, 3)) * 0.3
        w = torch.tanh(w / 50.0) * 50.0
        return torch.matmul(torch.softmax(w, dim=-1), v)

    out = _left_alone(softcapped, q, k, v, reason="unrecognised op")
    torch.testing.assert_close(out, softcapped(q, k, v), atol=ATOL, rtol=RTOL)


def test_non_attention_matmul_is_not_a_site():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    compiled(lambda a, b: torch.softmax(a @ b, dim=-1) @ b)(a, b)  # 2-D: not [B, H, L, D] attention
    assert kvpass.report().sites == [] and len(kvpass.report().graphs) == 1
