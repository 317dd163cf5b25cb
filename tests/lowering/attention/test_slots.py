"""SnapKV's, H2O's and streaming's decode step on fixed-capacity budget slots in one kernel
(``lowering/attention/slots``) against the torch path it replaces (``fixed_budgeted.choose_and_write``): the same
bytes in the whole buffer (scores, positions, every row section) and the mask over the slots that ``kept_mask``
gives, on adversarial metadata: empty slots, stored NEVER scores, equal scores, tokens inside and outside the
protected recent region, sinks held and still to choose (streaming), H2O's step weights added to the scores, masks
that hide the new token or old positions, bool and additive, broadcast or per head, GQA groups, one or a few query
rows."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowering.attention.launchers import load
from lowering.core import packed
from lowering.core.limits import masked_value
from lowering.formats import fixed_capacity as fc
from lowering.formats.budgeted import NEVER
from lowering.formats.fixed_budgeted import (
    choose_and_write,
    decode_candidates,
    fused_step_weights,
    general_format,
    kept_mask,
    new_rows,
    slot_rule,
)
from lowering.formats.streaming import SINK

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CAPACITY = 64


@st.composite
def problems(draw):
    budget = draw(st.integers(1, 40))
    batch, kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    position = draw(st.integers(budget, CAPACITY - 1))  # the new token's; earlier ones fill the slots
    return dict(policy=draw(st.sampled_from(["snapkv", "h2o", "streaming"])), budget=budget, batch=batch,
                kv_heads=kv_heads,
                group=group, position=position,
                q_len=draw(st.sampled_from([1, 1, 3])), kv_bits=draw(st.sampled_from([16, 8, "fp8"])),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                mask_kind=draw(st.sampled_from(["bool", "additive", "broadcast"])),
                empty=draw(st.floats(0, 1)), hidden=draw(st.floats(0, 0.5)), never=draw(st.floats(0, 0.4)),
                ties=draw(st.booleans()), hide_new=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def build(pr, device):
    """A budget state of random bytes with valid metadata, the new token's rows, and the step's mask."""
    g = torch.Generator().manual_seed(pr["seed"])
    B, H, K, p = pr["batch"], pr["kv_heads"], pr["budget"], pr["position"]
    spec = fc.FixedCacheSpec(kv_bits=pr["kv_bits"], batch=B, kv_heads=H, capacity=CAPACITY, k_dim=16, v_dim=16,
                             dtype=str(pr["dtype"]), policy=pr["policy"], budget=K)
    buffer = torch.randint(0, 256, (packed.layout_nbytes(spec.layout),), generator=g, dtype=torch.uint8)
    state = packed.views(buffer, spec.layout)
    for t in state.values():  # finite floats: torch's CPU scatter rewrites a bf16 NaN's payload (bits, not value),
        if t.is_floating_point():  # and H2O's weights read the keys (fp8 codes too): a cache holds no NaN
            t.copy_(torch.randn(t.shape, generator=g))
    pos = torch.stack([torch.randperm(p, generator=g)[:K] for _ in range(B * H)]).view(B, H, K)
    pos[torch.rand(B, H, K, generator=g) < pr["empty"]] = fc.EMPTY
    state["pos"].copy_(pos)
    if pr["policy"] == "streaming":  # positions as scores, some sinks
        score = torch.where(torch.rand(B, H, K, generator=g) < 0.3, SINK, pos.float())
    elif pr["ties"]:
        score = torch.randint(0, 4, (B, H, K), generator=g).float()
    else:
        score = torch.rand(B, H, K, generator=g)
    score[torch.rand(B, H, K, generator=g) < pr["never"]] = NEVER
    state["score"].copy_(score)
    hq = H * pr["group"]
    shape = (B, 1 if pr["mask_kind"] == "broadcast" else hq, pr["q_len"], CAPACITY)
    seen = torch.rand(shape, generator=g) >= pr["hidden"]
    seen[..., p] = not pr["hide_new"] or torch.rand(shape[:-1], generator=g) < 0.5
    mask = seen if pr["mask_kind"] == "bool" else torch.where(seen, 0.0, masked_value(pr["dtype"])).to(pr["dtype"])
    new_k, new_v = (torch.randn(B, H, 1, 16, generator=g).to(pr["dtype"]) for _ in range(2))
    q = torch.randn(B, hq, pr["q_len"], 16, generator=g).to(pr["dtype"])
    moved = [t.to(device) for t in (buffer, mask, new_k, new_v, q)]
    return spec, *moved, torch.tensor([p], device=device)


@settings(max_examples=60, deadline=None)
@given(pr=problems())
def test_kernel_writes_what_the_torch_path_writes(pr, kvpass_device):
    spec, buffer, mask, new_k, new_v, q, positions = build(pr, kvpass_device)
    fmt = general_format(spec)
    rows = new_rows(fmt.storage, new_k, new_v)
    want = buffer.clone()
    want_state = packed.views(want, spec.layout)
    choose_and_write(fmt, q, want_state, {name: want_state[name] for name in rows}, positions, new_k, rows, mask,
                     0.25, spec, "site")
    state = packed.views(buffer, spec.layout)
    slots = {name: state[name] for name in rows}
    kernels = load().slots
    assert kernels.unsupported_reason(slots, rows, state["pos"], state["score"], mask) is None
    rule = slot_rule(fmt)
    weights = None
    if rule.accumulates:  # H2O: the step's weights as the torch path computes them, before anything is written
        weights = decode_candidates(fmt, q, state, slots, positions, new_k, mask, 0.25, spec, "site").weights()
    kept = kernels.replace_step(state["pos"], state["score"], positions, mask, slots, rows, q.shape[1], q.shape[2],
                                NEVER, rule, weights)
    assert torch.equal(buffer, want)
    assert torch.equal(kept, kept_mask(mask, state["pos"], q.shape[1], q.shape[2], CAPACITY))


def test_a_step_the_kernel_does_not_take_is_named():
    """More row sections than the kernel writes, or slots that are not one row each, are refused with a reason."""
    pos = torch.zeros(1, 1, 4, dtype=torch.int64)
    mask = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    rows = {f"s{i}": torch.zeros(1, 1, 1, 2) for i in range(5)}
    slots = {f"s{i}": torch.zeros(1, 1, 4, 2) for i in range(5)}
    assert "5 sections" in load().slots.unsupported_reason(slots, rows, pos, pos.float(), mask)
    assert "not one row per slot" in load().slots.unsupported_reason({"k": torch.zeros(1, 1, 3, 2)},
                                                                      {"k": torch.zeros(1, 1, 1, 2)}, pos,
                                                                      pos.float(), mask)


@settings(max_examples=40, deadline=None)
@given(pr=problems())
def test_h2o_fused_step_weights_are_the_torch_paths(pr, kvpass_device):
    """H2O's step weights by the fused scoring kernel (CUDA's, over 16-bit slots) against the torch path's
    (``decode_candidates(...).weights()``) on the same adversarial slots and masks: equal up to fp32 summation order,
    0 for empty slots."""
    pr = {**pr, "policy": "h2o", "kv_bits": 16}
    spec, buffer, mask, new_k, new_v, q, positions = build(pr, kvpass_device)
    fmt = general_format(spec)
    state = packed.views(buffer, spec.layout)
    slots = {name: state[name] for name in new_rows(fmt.storage, new_k, new_v)}
    fused = fused_step_weights(q, state, slots, positions, new_k, mask, 0.25, spec)
    assert fused is not None
    want = decode_candidates(fmt, q, state, slots, positions, new_k, mask, 0.25, spec, "site").weights()
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-6)
    assert (fused[..., :-1][state["pos"] < 0] == 0).all()
