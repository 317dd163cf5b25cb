"""The budgeted formats' in-place decode step (``lowering/formats/slot_replacement.py``) against their general step.

- through ``kvpass::cache_attention``, step by step: the in-place step runs once the hot set is full, keeps
  exactly the general step's tokens (the same positions, bit for bit the same rows and scores, in another
  slot order), and its output is float64 attention over them within the exact-attention tolerance;
- the weakest candidate is the one ``budgeted.select`` orders last, on data with many equal keys;
- a slot older than its buffer's rewrite raises instead of reading another step's tokens.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpass.testing as kt
from lowering.core import packed, stats
from lowering.formats import FormatSpec, build_format
from lowering.formats.budgeted import gather_model_mask, select, take, visible_column, visible_tokens
from lowering.formats.slot_replacement import weakest

IN_PLACE_POLICIES = ["streaming", "snapkv", "asl"]


def decode_calls(batch, kv_heads, group, dim, prompt, steps, pads, seed):
    """Tensors of a prefill then single-token steps with left padding, and each step's HF-style bool mask."""
    g = torch.Generator().manual_seed(seed)
    L = prompt + steps
    k, v = (torch.randn(batch, kv_heads, L, dim, generator=g) for _ in range(2))
    q = torch.randn(batch, kv_heads * group, L, dim, generator=g)
    calls = []
    for t in range(steps + 1):
        lo, hi = (0, prompt) if t == 0 else (prompt + t - 1, prompt + t)
        mask = (torch.arange(hi)[None, :] <= torch.arange(lo, hi)[:, None])[None, None].repeat(batch, 1, 1, 1)
        for b, pad in enumerate(pads):
            mask[b, :, :, :pad] = False
        calls.append((lo, hi, mask))
    return q, k, v, calls


def run_op(spec, q, k, v, calls):
    """Each call through the op with the previous step's slots; (outputs, each step's sections, in-place steps)."""
    fmt = build_format(spec)
    B, Hkv, _, D = k.shape
    empty = torch.empty(0)
    past_k = past_v = empty
    outs, states, in_place = [], [], []
    for lo, hi, mask in calls:
        before = stats.calls["policy_replace_in_place"]
        out, kbuf, vbuf = torch.ops.kvpass.cache_attention(q[:, :, lo:hi], past_k, past_v, k[:, :, lo:hi],
                                                           v[:, :, lo:hi], mask, False, None, spec, "site")
        in_place.append(stats.calls["policy_replace_in_place"] - before)
        sections = packed.views(packed.whole_buffer(kbuf), fmt.layout(B, Hkv, hi, D, D, q.dtype))
        outs.append(out)
        states.append({name: t.clone() for name, t in sections.items()})
        past_k, past_v = packed.slot_view(kbuf, (B, Hkv, hi, D)), packed.slot_view(vbuf, (B, Hkv, hi, D))
    return outs, states, in_place


def in_position_order(state):
    """Every section's rows reordered by position (the general step stores them so)."""
    order = state["pos"].long().argsort(-1)
    return {name: take(t, order) for name, t in state.items()}


@pytest.mark.parametrize("kv_bits", [16, 8, "fp8"])
@pytest.mark.parametrize("policy", IN_PLACE_POLICIES)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2 ** 16), budget=st.integers(1, 24), group=st.sampled_from([1, 2, 4]))
def test_in_place_step_keeps_the_general_steps_tokens(policy, kv_bits, seed, budget, group):
    q, k, v, calls = decode_calls(2, 2, group, 16, 30, 6, (0, 9), seed)
    specs = {in_place: FormatSpec(kv_bits=kv_bits, policy=policy, budget=budget, replace_in_place=in_place).to_json()
             for in_place in (False, True)}
    runs = {}
    for in_place, spec in specs.items():
        if policy == "asl":
            build_format(spec).reset()  # a fresh forward for every hypothesis example
        runs[in_place] = run_op(spec, q, k, v, calls)
    (_, general, _), (outs, fast, used) = runs[False], runs[True]
    fmt = build_format(specs[True])
    for (lo, hi, mask), out, a, b, n in zip(calls, outs, general, fast, used):
        assert n == (lo >= budget and hi - lo == 1), f"in-place step at {lo} -> {hi} tokens, budget {budget}: {n}"
        b_ordered = in_position_order(b)
        for name in a:  # the same tokens, rows and scores, bit for bit
            assert torch.equal(a[name], b_ordered[name]), f"{policy}, kv_bits={kv_bits}: section {name} at t={hi}"
        pos = b["pos"].long()
        assert (pos.sort(-1).values.diff(dim=-1) > 0).all(), "kept positions must be unique"
        if lo == 0:
            continue
        hot = {name: b[name] for name in b if name not in ("pos", "score")}
        hot_k, hot_v = fmt.storage.dequantize(hot, pos.shape[-1], q.dtype)
        problem = kt.make_problem(batch=2, q_heads=q.shape[1], kv_heads=k.shape[1], q_len=1, kv_len=pos.shape[-1],
                                  head_dim=k.shape[-1])
        sub = dataclasses.replace(problem, q=q[:, :, lo:hi], k=hot_k, v=hot_v,
                                  attn_mask=gather_model_mask(mask, pos, q.shape[1], 1, hi))
        # float64 attention over the kept rows (as stored, dequantized), exact-attention tolerance: the
        # kernel attends over those rows in slot order; no quantization error enters (the oracle reads them)
        kt.assert_attention_close(out, kt.reference_attention(sub), kt.tolerance_for(sub), context=f"{policy} t={hi}")


@settings(max_examples=50)
@given(rows=st.integers(1, 4), n=st.integers(2, 40), levels=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_weakest_is_what_select_orders_last(rows, n, levels, seed):
    g = torch.Generator().manual_seed(seed)
    key = torch.randint(0, levels, (rows, 1, n), generator=g).float()  # few levels: many equal keys
    key[..., 0] = -torch.inf if levels > 2 else key[..., 0]  # an unattendable candidate
    pos = torch.stack([torch.randperm(1000, generator=g)[:n] for _ in range(rows)])[:, None]
    _, last = select(key, n - 1, pos)
    assert torch.equal(weakest(key, pos), last[..., 0])


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.integers(1, 3), q_len=st.integers(1, 3),
       length=st.integers(1, 20), additive=st.booleans(), broadcast=st.sampled_from(["none", "heads", "rows"]),
       seed=st.integers(0, 2 ** 16))
def test_visible_column_is_visible_tokens_at_the_column(batch, kv_heads, group, q_len, length, additive, broadcast,
                                                         seed):
    """The decode step's visibility of its new token, read from one mask column, is the general step's
    ``visible_tokens`` at that position: bool and additive masks, per-head or broadcast, rows all masked."""
    g = torch.Generator().manual_seed(seed)
    q_heads = kv_heads * group
    shape = {"none": (batch, q_heads, q_len, length), "heads": (batch, 1, q_len, length),
             "rows": (1, 1, q_len, length)}[broadcast]
    mask = torch.rand(shape, generator=g) < 0.6
    if additive:
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    column = int(torch.randint(0, length, (), generator=g))
    pos = torch.full((batch, kv_heads, 1), column, dtype=torch.long)
    want = visible_tokens(mask, False, q_len, length, pos, q_heads)
    got = visible_column(mask, q_len, length, column, kv_heads, q_heads, "cpu").expand(batch, kv_heads, 1)
    assert torch.equal(got, want)
    assert visible_column(None, q_len, length, column, kv_heads, q_heads, "cpu").all()


def test_a_stale_slot_of_a_rewritten_buffer_raises():
    q, k, v, calls = decode_calls(1, 2, 2, 16, 12, 3, (0,), 0)
    spec = FormatSpec(policy="streaming", budget=8, replace_in_place=True).to_json()
    empty = torch.empty(0)
    B, Hkv, _, D = k.shape
    _, kbuf, vbuf = torch.ops.kvpass.cache_attention(q[:, :, :12], empty, empty, k[:, :, :12], v[:, :, :12],
                                                     calls[0][2], False, None, spec, "site")
    first = packed.slot_view(kbuf, (B, Hkv, 12, D)), packed.slot_view(vbuf, (B, Hkv, 12, D))
    step = lambda past, t: torch.ops.kvpass.cache_attention(  # noqa: E731
        q[:, :, t:t + 1], *past, k[:, :, t:t + 1], v[:, :, t:t + 1], calls[t - 11][2], False, None, spec, "site")
    _, kbuf2, vbuf2 = step(first, 12)  # rewrites the buffer behind ``first`` in place
    with pytest.raises(RuntimeError, match="rewrote"):
        step(first, 12)
