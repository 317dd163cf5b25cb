"""Budgeted policies on fixed-capacity buffers (``lowering/formats/fixed_budgeted.py``, ``fixed_adore.py``).

- every step keeps the general path's set (``lowering/formats/<policy>.py`` on the same tokens and masks), stores
  the same rows for it and returns its output up to summation order; ADORE's cold store holds the general
  path's released tokens;
- decode attention over the slots (empty ones, any order) is the float64 attention over the kept rows as stored;
- bookkeeping: min(L, budget) distinct positions per (row, KV head), EMPTY in the other slots; a one-token step on
  a full cache rewrites one slot per (row, KV head) at most (the device-index scatter), nothing else;
- a short first prompt under the plain causal mask is the general path's ``is_causal`` prefill;
- ASL's cross-layer rule, its state in the cache's store, settles on the general path's layer and selection;
- the eager read refuses with what to do; early exit with a policy is refused."""
from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_policies import POLICIES, asl_settling_problem, decode_sequence, fmt_for, run_sequence, run_step

import kvpass.testing as kt
from lowering import ops
from lowering.attention.launchers import load
from lowering.core import packed
from lowering.formats import fixed_capacity as fc
from lowering.formats import launch
from lowering.formats.budgeted import gather_model_mask, key_weights
from lowering.formats.fixed_adore import fused_decode_weights
from lowering.formats.fixed_budgeted import asl_store_layout, general_format, keep_order, kept_mask, new_rows
from lowering.storage.int8 import dequantize_rows

KV_BITS = (16, 8, "fp8", 4, "aligned")
CAPACITY = 64
# Outputs of the two paths differ only in summation order (slots out of position order, softmax sums over the
# empty slots' zeros): a few fp32 ulps of the output's magnitude.
SUM_ORDER = dict(rtol=1e-5, atol=1e-6)


def spec_for(policy, budget, kv_bits=16, batch=2, kv_heads=2, dim=16, **fields):
    return fc.FixedCacheSpec(kv_bits=kv_bits, batch=batch, kv_heads=kv_heads, capacity=CAPACITY, k_dim=dim,
                             v_dim=dim, dtype=str(torch.float32), policy=policy, budget=budget, **fields)


def asl_store(spec):
    return None if spec.policy != "asl" else torch.zeros(packed.layout_nbytes(asl_store_layout(spec)),
                                                         dtype=torch.uint8)


def fixed_step(spec, buffer, q, positions, k, v, mask, store=None, is_causal=False):
    """One step through the op; ``mask`` over the step's logical length is widened to the capacity, as a model's
    mask over a static cache is."""
    if mask is not None:
        mask = F.pad(mask, (0, CAPACITY - mask.shape[-1]), value=False)
    return ops.fixed_budget_attention(q, buffer, positions, k, v, mask, is_causal, None, spec.to_json(), "site",
                                      store)


def fixed_sequence(spec, q, k, v, calls):
    """``run_sequence`` on a fixed buffer: outputs and the buffer's sections (copies) after every step."""
    buffer, store, outs, states = fc.allocate(spec, "cpu"), asl_store(spec), [], []
    for lo, hi, mask in calls:
        outs.append(fixed_step(spec, buffer, q[:, :, lo:hi], torch.arange(lo, hi), k[:, :, lo:hi], v[:, :, lo:hi],
                               mask, store))
        states.append({name: t.clone() for name, t in packed.views(buffer, spec.layout).items()})
    return outs, states


def by_position(sections, pos_name="pos", names=None):
    """{position: rows of every section} of the held slots of (row 0.., head 0..) as nested lists, for equality."""
    pos = sections[pos_name].long()
    names = names or [n for n in sections if n not in ("pos", "score") and not n.startswith("cold_")]
    held = {}
    for b in range(pos.shape[0]):
        for h in range(pos.shape[1]):
            for slot, p in enumerate(pos[b, h].tolist()):
                if p >= 0:
                    held[(b, h, p)] = [sections[n][b, h, slot:slot + 1].view(torch.uint8).flatten().tolist()
                                       for n in names]
    return held


def assert_bookkeeping(sections, length, budget):
    pos = sections["pos"]
    held = pos >= 0
    assert (held.sum(-1) == min(length, budget)).all(), pos
    assert ((pos < length) & (pos >= fc.EMPTY)).all()
    ordered = pos.masked_fill(~held, length).sort(-1).values  # held positions first, ascending
    pairs = torch.arange(pos.shape[-1] - 1) < held.sum(-1, keepdim=True) - 1
    assert ((ordered[..., 1:] > ordered[..., :-1]) | ~pairs).all(), f"a position held twice: {pos}"


@pytest.mark.parametrize("kv_bits", KV_BITS, ids=str)
@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=4)
@given(seed=st.integers(0, 2 ** 16), budget=st.integers(1, 24), group=st.sampled_from([1, 2]),
       prompt=st.sampled_from([5, 12, 30]))
@example(seed=0, budget=8, group=2, prompt=5)  # a short prompt, then the slots fill and evict
@example(seed=1, budget=24, group=2, prompt=30)  # a prefill longer than the budget
def test_every_step_keeps_and_stores_what_the_general_path_does(policy, kv_bits, seed, budget, group, prompt):
    """Prefill then single-token steps with left padding: the kept positions, the stored rows at each position
    (bytes), the scores and the outputs are the general path's (ADORE: the cold store's positions and rows too)."""
    q, k, v, calls = decode_sequence(group=group, seed=seed, pads=(0, 3), prompt=prompt, steps=6)
    want_outs, want_states = run_sequence(fmt_for(policy, budget, kv_bits), q, k, v, calls)
    spec = spec_for(policy, budget, kv_bits)
    outs, states = fixed_sequence(spec, q, k, v, calls)
    for (lo, hi, _), out, want_out, s, want in zip(calls, outs, want_outs, states, want_states):
        at = f"{policy} kv_bits={kv_bits} after {hi} tokens"
        assert_bookkeeping(s, hi, budget)
        got_rows = by_position(s)
        assert got_rows == by_position({**want, "pos": want["pos"].long()}), at
        got_score = {key: s["score"][key[0], key[1], list(s["pos"][key[0], key[1]].tolist()).index(key[2])].item()
                     for key in got_rows}
        want_pos = want["pos"].long()
        want_score = {(b, h, p): want["score"][b, h, i].item() for b in range(want_pos.shape[0])
                      for h in range(want_pos.shape[1]) for i, p in enumerate(want_pos[b, h].tolist())}
        assert got_score.keys() == want_score.keys()
        for key, value in got_score.items():
            assert value == pytest.approx(want_score[key], rel=1e-5, abs=1e-6), (at, key)
        torch.testing.assert_close(out, want_out, **SUM_ORDER, msg=at)
        if policy == "adore":  # the cold store holds the general path's released tokens, as the same int8 rows
            cold = ("cold_k", "cold_k_scale", "cold_v", "cold_v_scale")
            want_cold = {**want, "cold_pos": want["cold_pos"].long()}
            assert by_position(s, "cold_pos", cold) == by_position(want_cold, "cold_pos", cold), at


@pytest.mark.parametrize("kv_bits", [16, 8, 4], ids=str)
@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=4)
@given(seed=st.integers(0, 2 ** 16), budget=st.integers(1, 20), dtype=st.sampled_from([torch.float32,
                                                                                       torch.bfloat16]))
def test_decode_attention_is_the_float64_attention_over_the_kept_rows(policy, kv_bits, seed, budget, dtype):
    """Each decode step's output is within the exact-attention tolerance of float64 attention over the slots' rows
    as stored (dequantized), under the model's mask at their positions: empty slots and slot order change nothing."""
    q, k, v, calls = decode_sequence(seed=seed, pads=(0, 4), prompt=20, steps=5, dtype=dtype)
    spec = dataclasses.replace(spec_for(policy, budget, kv_bits), dtype=str(dtype))
    outs, states = fixed_sequence(spec, q, k, v, calls)
    for (lo, hi, mask), out, s in zip(calls[1:], outs[1:], states[1:]):
        held = s["pos"] >= 0
        order = s["pos"].masked_fill(~held, CAPACITY).argsort(-1)[..., :min(hi, budget)]  # the held slots
        slots = {name: s[name] for name in s if name not in ("pos", "score") and not name.startswith("cold_")}
        hot_k, hot_v = spec.slot_storage.dequantize(slots, budget, dtype)
        pos = s["pos"].gather(-1, order)
        take = lambda t: t.gather(2, order[..., None].expand(*order.shape, t.shape[-1]))  # noqa: E731
        problem = kt.make_problem(batch=2, q_heads=q.shape[1], kv_heads=k.shape[1], q_len=1, kv_len=pos.shape[-1],
                                  head_dim=k.shape[-1], dtype=dtype)
        sub = dataclasses.replace(problem, q=q[:, :, lo:hi], k=take(hot_k), v=take(hot_v),
                                  attn_mask=gather_model_mask(mask, pos, q.shape[1], 1, hi))
        kt.assert_attention_close(out, kt.reference_attention(sub), kt.tolerance_for(sub), context=f"{policy} t={hi}")


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "adore"])  # ADORE may rebuild several tokens a step
def test_a_one_token_step_on_a_full_cache_rewrites_one_slot_at_most(policy):
    """Once the slots are full, a decode step writes the new token over the slot the policy frees, at a device
    index: every other slot's bytes stay."""
    q, k, v, calls = decode_sequence(prompt=30, steps=4, pads=(0, 3))
    spec = spec_for(policy, 8, 8)
    _, states = fixed_sequence(spec, q, k, v, calls)
    for before, after in zip(states[1:], states[2:]):
        changed = torch.zeros(before["pos"].shape, dtype=torch.bool)
        for name, t in after.items():
            if name != "score":  # H2O's scores accumulate on every slot
                def row_bytes(x):
                    return x.reshape(*x.shape[:3], -1).view(torch.uint8)
                changed |= (row_bytes(t) != row_bytes(before[name])).any(-1)
        assert (changed.sum(-1) <= 1).all(), changed


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "adore"])
def test_a_short_first_prompt_without_padding_is_the_general_paths_causal_prefill(policy):
    """HF gives a DynamicCache no mask for a first step without padding (SDPA's is_causal: the general path's
    prefill, which attends over every token and, for SnapKV, scores the window); a fixed cache gets the plain
    causal mask over its capacity. Both keep the same set and return the same output."""
    q, k, v, _ = decode_sequence(prompt=12, steps=0, pads=(0, 0))
    budget = 6
    want_out, want = run_step(fmt_for(policy, budget), q, None, 0, k, v, None, True, None)
    spec = spec_for(policy, budget)
    buffer = fc.allocate(spec, "cpu")
    causal = torch.ones(12, 12, dtype=torch.bool).tril()[None, None].expand(2, 1, 12, 12)
    out = fixed_step(spec, buffer, q, torch.arange(12), k, v, causal)
    got = packed.views(buffer, spec.layout)
    assert torch.equal(got["pos"].sort(-1).values, want["pos"].long().sort(-1).values)
    torch.testing.assert_close(out, want_out, **SUM_ORDER)


def test_asl_settles_on_the_general_paths_layer_with_its_state_in_the_cache():
    """Layers 0-1 see different keys, layers 2+ the same (asl_layers=(1, 2)): the rank spread drops to 0 at layer
    3, whose selection every later layer keeps on every head, as the general path's ASL; the forward's state is
    the cache's store (settled for every row), not the format object's."""
    B, Hkv, G, D, L, budget = 2, 2, 2, 16, 40, 20
    q, v, settled_k, mask, g = asl_settling_problem(B, Hkv, G, D, L)
    general = fmt_for("asl", budget, asl_layers=(1, 2))
    spec = spec_for("asl", budget, asl_layers=(1, 2))
    store = asl_store(spec)
    for layer in range(6):
        k = torch.randn(B, Hkv, L, D, generator=g) if layer < 2 else settled_k
        _, want = run_step(general, q, None, 0, k, v, mask, False, None, f"model.layers.{layer}.self_attn")
        layer_spec = dataclasses.replace(spec, layer=layer)
        buffer = fc.allocate(layer_spec, "cpu")
        fixed_step(layer_spec, buffer, q, torch.arange(L), k, v, mask.expand(B, 1, L, L), store)
        pos = packed.views(buffer, layer_spec.layout)["pos"].sort(-1).values
        assert torch.equal(pos, want["pos"].long()), f"layer {layer}"
        if layer >= 3:
            assert torch.equal(pos[:, 0], pos[:, 1]), "a settled selection is every head's"
    assert general.forward_state.settled.all()
    assert packed.views(store, asl_store_layout(spec))["settled"].all()


def test_the_eager_read_refuses_and_says_to_compile():
    spec = spec_for("streaming", 8)
    one = torch.zeros(2, 2, 1, 16)
    with pytest.raises(RuntimeError, match="backend='kvpass'"):
        ops.fixed_budget_read(fc.allocate(spec, "cpu"), torch.tensor([0]), one, one, spec.to_json(), None)


def test_layout_is_the_slots_positions_and_scores():
    """budget slots in the scheme's per-token form (int4: per-token rows), int64 positions starting EMPTY, fp32
    scores; ADORE's cold store spans the capacity (+1 scratch row); nothing else."""
    for kv_bits in KV_BITS:
        spec = spec_for("h2o", 8, kv_bits)
        layout = spec.layout
        assert layout["pos"] == ((2, 2, 8), torch.int64) and layout["score"] == ((2, 2, 8), torch.float32)
        assert {n: layout[n] for n in layout if n not in ("pos", "score")} == \
            spec.slot_storage.layout(2, 2, 8, 16, 16, torch.float32)
        assert (packed.views(fc.allocate(spec, "cpu"), layout)["pos"] == fc.EMPTY).all()
    assert spec_for("h2o", 8, 4).slot_storage.name.startswith("int4 per-token rows")
    adore = spec_for("adore", 8).layout
    assert adore["cold_k"] == ((2, 2, CAPACITY + 1, 16), torch.int8)
    assert adore["cold_pos"] == ((2, 2, CAPACITY + 1), torch.int64)


def test_a_spec_refuses_early_exit_with_a_policy_and_a_budget_without_one():
    with pytest.raises(ValueError, match="general path"):
        spec_for("h2o", 8, early_exit=1e-3)
    with pytest.raises(ValueError, match="budget"):
        spec_for("full", 8)
    with pytest.raises(ValueError, match="budget"):
        spec_for("h2o", None)


@pytest.mark.parametrize("kv_bits", [16, 8, "fp8"], ids=str)
@pytest.mark.parametrize("policy", ["snapkv", "asl", "h2o", "streaming"])
def test_the_fused_decode_step_inside_the_op_is_the_torch_paths(policy, kv_bits, monkeypatch):
    """The decode step by the slots kernel (CUDA's path for SnapKV, ASL, H2O and streaming, forced here under the
    interpreter) inside the op: every step's buffer bytes and output equal the torch path's, through eviction."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("forces the kernel on CPU tensors: needs the interpreter (on a GPU the op takes it itself)")
    q, k, v, calls = decode_sequence(group=2, seed=3, pads=(0, 3), prompt=12, steps=8)
    spec = spec_for(policy, 6, kv_bits)
    want_outs, want_states = fixed_sequence(spec, q, k, v, calls)
    taken = []
    kernels = load().slots

    def forced(state, slots, rows, positions, mask, q_heads, q_len, never, rule, weights_of=None):
        assert kernels.unsupported_reason(slots, rows, state["pos"], state["score"], mask) is None
        taken.append(rule)
        return kernels.replace_step(state["pos"], state["score"], positions, mask, slots, rows, q_heads, q_len,
                                    never, rule, weights_of() if rule.accumulates else None)

    monkeypatch.setattr(launch, "slot_replace", forced)
    outs, states = fixed_sequence(spec, q, k, v, calls)
    assert len(taken) == len(calls) - 1  # every decode step
    for out, want_out, s, want in zip(outs, want_outs, states, want_states):
        assert torch.equal(out, want_out)
        assert all(torch.equal(s[name], want[name]) for name in s)


@pytest.mark.parametrize("kv_bits", [16, 8], ids=str)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2 ** 16), budget=st.integers(1, 8), group=st.sampled_from([1, 2, 4]))
@example(seed=4, budget=6, group=2)  # released tokens and empty cold rows at the last step
def test_adore_fused_decode_weights_are_the_float64_weights(kv_bits, seed, budget, group):
    """ADORE's decode-step weights by the fused scoring kernel (CUDA's path, forced here under the interpreter):
    over the hot slots, the cold store read as int8 codes and scales, and the new token, after evictions, with left
    padding; against the float64 mean softmax weights over the same keys (the cold ones dequantized) under the mask
    at their positions, within fp32 rounding of weights <= 1, and 0 at the empty hot slots and cold rows. fp32
    models: the kernel's 16-bit rounding is its own tests' (lowering/attention/scored)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernel on CPU tensors: needs the interpreter (on a GPU the op takes it itself)")
    q, k, v, calls = decode_sequence(group=group, seed=seed, pads=(0, 3), prompt=12, steps=8)
    spec = spec_for("adore", budget, kv_bits)
    buffer = fc.allocate(spec, "cpu")
    for lo, hi, mask in calls[:-1]:
        fixed_step(spec, buffer, q[:, :, lo:hi], torch.arange(lo, hi), k[:, :, lo:hi], v[:, :, lo:hi], mask)
    lo, hi, mask = calls[-1]
    state = packed.views(buffer, spec.layout)
    storage = general_format(spec).storage
    new_k = k[:, :, lo:hi]
    hot_k, _ = storage.dequantize({name: state[name] for name in new_rows(storage, new_k, v[:, :, lo:hi])},
                                  spec.budget, q.dtype)
    pos = torch.cat([state["pos"], state["cold_pos"], torch.full_like(state["pos"][..., :1], lo)], 2)
    wide = F.pad(mask, (0, CAPACITY - mask.shape[-1]), value=False)
    assert (state["cold_pos"] >= 0).any()  # the step scores released tokens
    fused = fused_decode_weights(q[:, :, lo:hi], hot_k, state, new_k, pos, wide, 0.25, spec)
    assert fused is not None
    keys = torch.cat([hot_k.double(), dequantize_rows(state["cold_k"], state["cold_k_scale"], torch.float64),
                      new_k.double()], 2)
    seen = kept_mask(wide, pos, q.shape[1], 1, CAPACITY)
    bias = torch.zeros(seen.shape, dtype=torch.float64).masked_fill(~seen, -torch.inf)
    want = key_weights(q[:, :, lo:hi].double(), keys, bias, 0.25, mean=True)
    torch.testing.assert_close(fused.double(), want, rtol=1e-4, atol=1e-5 * group)
    assert (fused[pos < 0] == 0).all()


@settings(max_examples=60, deadline=None)
@given(data=st.data(), width=st.integers(1, 40), with_pos=st.booleans())
def test_keep_order_is_the_stable_sorts_of_select(data, width, with_pos):
    """keep_order's one sort (two with positions) against the three stable sorts it stands for: by position, by key
    descending, empty slots last; on keys with ties, -inf (unattendable tokens and empty slots), +inf (protected) and
    NEVER-free scores, positions with ties."""
    values = st.sampled_from([-math.inf, math.inf, 0.0, 0.5, 1.0, 2.5, -3.0])
    key = torch.tensor([data.draw(values) for _ in range(width)]).view(1, 1, width)
    real = torch.tensor([data.draw(st.booleans()) for _ in range(width)]).view(1, 1, width)
    key = torch.where(real, key, -math.inf)  # an empty slot's key is -inf (not visible)
    pos = torch.tensor([data.draw(st.integers(0, 5)) for _ in range(width)]).view(1, 1, width)
    by = pos if with_pos else torch.zeros_like(pos)
    order = by.argsort(dim=-1, stable=True)
    order = order.gather(-1, key.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    want = order.gather(-1, (~real).gather(-1, order).to(torch.int32).argsort(dim=-1, stable=True))
    assert torch.equal(keep_order(key, pos if with_pos else None, real), want)
