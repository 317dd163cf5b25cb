"""Budgeted policies on fixed-capacity buffers: ``budget`` slots per KV head, the evicted slot chosen on the device.

The ``policy`` / ``budget`` options of the general path (``lowering/formats/budgeted.py`` and one module per
policy) on a ``FixedCacheSpec`` with a budget (``fixed_capacity.budget_layout``: the slots in the scheme's per-token
form, their positions int64 [B, Hkv, budget], EMPTY = -1 for a slot holding no token, and the policy's scores fp32
[B, Hkv, budget]). The policies' own code decides (``score``, ``protected``, ``selection_key`` of the general
format); this module gives them the step's candidates, the budget slots then the new tokens, with the device
length in place of the host's (``FixedCandidates``), and writes the kept set back into the slots.

Write, selection and attention are one op, ``fixed_budget_attention`` (the selection needs the query and the
model's mask, which a cache's ``update`` does not see):

- a one-token step (decode): the new token's scores, then the candidate the general step would drop: the first
  empty slot while there is one, else the smallest selection key (equal keys: the highest position), by
  ``slot_replacement.weakest``. The new token is scattered into that slot (``slot_replacement.put``: one row per
  (batch row, KV head) and section, at a device index), or nowhere when it is the one dropped; then the
  scheme's decode attention over the ``budget`` slots under the model's mask gathered at their positions
  (empty slots hidden). Fixed shapes, no host read: CUDA graphs capture it. SnapKV's, ASL's, H2O's and streaming's
  choice and writes are one kernel on CUDA (``lowering/attention/slots``; H2O's weights of the step computed before
  it: by the fused scoring kernel over 16-bit slots, as the general path scores on CUDA, else as the torch path
  computes them), the same bytes as the torch path given those weights.
- a longer step (prefill, or a short prompt): the candidates in position order with the empty slots last (the
  order the general path's window pooling reads neighbours in), the policy's scores, the top ``budget`` by
  selection key (``keep_order``: ``budgeted.select``'s order, empty slots last) written back in position order.
  A prefill-length step (> ``MAX_DECODE_QUERY_LEN`` tokens, or SDPA's ``is_causal``) attends exactly over every
  candidate, as the general path's prefill; a shorter one as a decode step, over the kept slots, unless it is
  a first write (position 0) whose mask is the plain causal one, which the general path also takes as a prefill
  (``budgeted.plain_causal``: some versions of HF's generate pass that mask on a DynamicCache as none and SDPA's
  ``is_causal``; a fixed cache always gets one). That flag is a device tensor, so both results are computed and one
  is taken (``torch.where``).

ASL's cross-layer rule (``lowering/formats/asl.py``) needs the ranks of earlier layers of the same forward: they
live in the cache's ASL store (``asl_store_layout``, one per ``PackedCache``, passed to every layer's op), indexed
by the layer's index in the spec, updated only where the step is one the general path ranks (a prefill over a
cache that dropped nothing yet). ADORE has its own step (``fixed_adore.py``).

Equal to the general path up to summation order: the slots are not in position order after replacements, and
weights sum over the empty slots' zeros too, so the policies' float scores (H2O's accumulated weights) can differ
in their last bits; selection by exactly equal keys is the general path's (ties by position).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from lowering.core import packed, stats
from lowering.core.limits import MAX_DECODE_QUERY_LEN, masked_value
from lowering.core.operands import KeySegment, SlotRule
from lowering.core.packed import Layout
from lowering.core.reference import exact_attention
from lowering.formats import FormatSpec, asl, build_format, launch
from lowering.formats.budgeted import (
    NEVER,
    SCORE_CHUNK_ELEMENTS,
    BudgetedFormat,
    Candidates,
    candidate_bias,
    gather_model_mask,
    key_weights,
    plain_causal,
    take,
    visible_tokens,
)
from lowering.formats.fixed_capacity import EMPTY, FixedCacheSpec, positional_mask
from lowering.formats.h2o import HeavyHitters
from lowering.formats.slot_replacement import ReplacesInPlace, put, weakest
from lowering.formats.snapkv import SnapKV, decode_recent
from lowering.formats.streaming import SINK, Streaming
from lowering.storage import State

EMPTY_LAST = torch.iinfo(torch.int64).max  # sort key of an empty slot: after every position (slots in position order)


def general_format(spec: FixedCacheSpec) -> BudgetedFormat:
    """The general path's format of the same policy, budget and storage: its scoring and selection rules (the
    formats keep no state of a step but ASL's forward, which the fixed path keeps in the cache instead)."""
    return build_format(FormatSpec(kv_bits=spec.kv_bits, policy=spec.policy, budget=spec.budget,
                                   asl_layers=spec.asl_layers).to_json())


def asl_store_layout(spec: FixedCacheSpec) -> Layout:
    """ASL's per-forward store, one per cache: the ranks of the last ``span`` layers ``ranks`` int64
    [span, B, budget + capacity] (candidate index: position order, empty slots last), the spread at the first
    layer ``base`` fp32 [B], ``settled`` bool [B] and the selection layer's scores ``chosen`` fp32
    [B, budget + capacity]."""
    _, span = spec.asl_layers or (asl.FIRST_LAYER, asl.SPAN)
    width = spec.budget + spec.capacity
    return {"ranks": ((span, spec.batch, width), torch.int64), "base": ((spec.batch,), torch.float32),
            "settled": ((spec.batch,), torch.bool), "chosen": ((spec.batch, width), torch.float32)}


@dataclasses.dataclass
class FixedCandidates(Candidates):
    """A fixed-capacity step's candidates: the budget slots (some empty) and the new tokens. ``length`` is the
    mask's width (the capacity, a shape), ``written`` the logical length after the step (int64 device scalar),
    ``real`` bool [B, Hkv, C] the candidates holding a token; ``attn_mask`` is always a mask over the capacity
    (positional where the model gave none) and ``is_causal`` False."""

    written: torch.Tensor | None = None
    real: torch.Tensor | None = None
    fresh: torch.Tensor | None = None  # bool [B, Hkv, C]: this step's tokens (not always the last n candidates)

    @property
    def is_new(self) -> torch.Tensor:
        return self.fresh

    def newest(self, count) -> torch.Tensor:
        return self.real & (self.pos >= self.written - count)

    def bias(self, rows: slice) -> torch.Tensor:
        """Float32 additive mask of query ``rows`` over the candidates, [B, Hq, r, C] (empty slots -inf)."""
        hq, hkv = self.q.shape[1], self.pos.shape[1]
        b = candidate_bias(self.attn_mask, False, rows, self.q.shape[2], self.length, self.pos.clamp(min=0), False, hq)
        return b.masked_fill(~self.real.repeat_interleave(hq // hkv, 1)[:, :, None], -math.inf)

    def weights(self, *, mean: bool = False) -> torch.Tensor:
        """Weights from every query, [B, Hkv, C], in query chunks (``budgeted.all_query_weights``)."""
        B, Hq, Lq, _ = self.q.shape
        chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, B * Hq * self.k.shape[2]))
        total = None
        for start in range(0, Lq, chunk):
            rows = slice(start, min(Lq, start + chunk))
            w = key_weights(self.q[:, :, rows], self.k, self.bias(rows), self.scale)
            total = w if total is None else total + w
        return total / Lq if mean else total

    def window_scores(self, window: int, *, pool: str, kernel: int, mean: bool = False) -> torch.Tensor:
        """``budgeted.window_scores`` over the candidates, pooled over token neighbours only (``pooled``)."""
        Lq = self.q.shape[2]
        rows = slice(Lq - window, Lq)
        w = key_weights(self.q[:, :, rows], self.k, self.bias(rows), self.scale, mean=mean)
        return pooled(w, self.real, pool, kernel) if kernel > 1 else w


def pooled(w: torch.Tensor, real: torch.Tensor, pool: str, kernel: int) -> torch.Tensor:
    """w [B, H, C] pooled over ``kernel`` neighbours (stride 1, same length) as ``budgeted.window_scores`` pools
    its candidates, empty slots (``real`` False, after the tokens) counting as padding: max over the tokens, or
    their sum over their count (avg_pool's ``count_include_pad=False``, the same sums and division)."""
    B, H, C = w.shape
    pad = kernel // 2
    if pool == "max":
        out = F.max_pool1d(w.masked_fill(~real, -math.inf).reshape(B * H, 1, C), kernel, stride=1, padding=pad)
    else:
        def sums(t):
            return F.avg_pool2d(t.reshape(B * H, 1, 1, C), (1, kernel), stride=1, padding=(0, pad), divisor_override=1)
        out = sums(w.masked_fill(~real, 0.0)) / sums(real.to(w.dtype)).clamp_min(1)
    return out.reshape(B, H, C).masked_fill(~real, 0.0)


def keep_order(key: torch.Tensor, pos: torch.Tensor | None, real: torch.Tensor) -> torch.Tensor:
    """Indices [B, H, C] of the candidates, the first kept first: ``budgeted.select``'s order (selection key
    descending, equal keys by position ``pos``, or by candidate index where it is None) with every empty slot after
    the tokens. One sort by key (two with ``pos``): a token's key of -inf (unattendable) sorts as NEVER, above the
    empty slots' -inf and below every other key (a visible token's key is a score above NEVER, or +inf)."""
    key = torch.where(real, key.masked_fill(key == -math.inf, NEVER), -math.inf)
    if pos is None:
        return key.argsort(dim=-1, descending=True, stable=True)
    order = pos.argsort(dim=-1, stable=True)
    return order.gather(-1, key.gather(-1, order).argsort(dim=-1, descending=True, stable=True))


def slot_names(state: State) -> list[str]:
    """The storage scheme's sections among a budgeted buffer's."""
    return [name for name in state if name not in ("pos", "score") and not name.startswith("cold_")]


def new_rows(storage, new_k: torch.Tensor, new_v: torch.Tensor) -> State:
    """new_k, new_v [B, Hkv, n, D] in the storage scheme's sections."""
    B, H, n, dk = new_k.shape
    rows = {name: torch.empty(shape, dtype=dt, device=new_k.device)
            for name, (shape, dt) in storage.layout(B, H, n, dk, new_v.shape[-1], new_k.dtype).items()}
    launch.append(storage, None, 0, new_k, new_v, rows)
    return rows


def kept_mask(mask: torch.Tensor, pos: torch.Tensor, q_heads: int, q_len: int, capacity: int) -> torch.Tensor:
    """The model's mask (dtype kept) at the positions ``pos`` [B, Hkv, K], [B, Hq, Lq, K], EMPTY slots hidden."""
    m = gather_model_mask(mask, pos.clamp(min=0), q_heads, q_len, capacity)
    held = (pos >= 0).repeat_interleave(q_heads // pos.shape[1], 1)[:, :, None]
    return torch.where(held, m, masked_value(m.dtype))


def attend_slots(storage, q, slots: State, pos, mask, scale: float, spec: FixedCacheSpec,
                 kept: torch.Tensor | None = None) -> torch.Tensor:
    """The scheme's decode attention over the ``budget`` slots under the model's mask at their positions (``kept``:
    that mask, [B, Hq, Lq, budget], where the caller has it already)."""
    m = kept_mask(mask, pos, q.shape[1], q.shape[2], spec.capacity) if kept is None else kept
    return launch.decode_attention(storage, q, slots, spec.budget, m, scale).contiguous()


def causal_first(mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """bool device scalar: a first write (position 0) under the plain causal mask, no padding in any row: a prefill
    on the general path (``budgeted.plain_causal``), whatever form HF's generate gives its mask."""
    return (positions[0] == 0) & plain_causal(mask, positions.numel())


def model_mask(q, attn_mask, is_causal: bool, positions, capacity: int) -> torch.Tensor:
    """The mask over the capacity the step works with: the model's, or the positional causal one."""
    if attn_mask is None or is_causal:
        return positional_mask(q, positions, capacity)
    return attn_mask


def attention(q, buffer, positions, new_k, new_v, attn_mask, is_causal: bool, scale, spec: FixedCacheSpec,
              site: str, asl_store: torch.Tensor | None = None) -> torch.Tensor:
    """Write new_k, new_v [B, Hkv, n, D] (at ``positions``, int64 [n]) into the budget slots by the policy and
    return q [B, Hq, Lq, D]'s attention over the cache -> [B, Hq, Lq, Dv] (module docstring)."""
    fmt = general_format(spec)
    state = packed.views(buffer, spec.layout)
    mask = model_mask(q, attn_mask, is_causal, positions, spec.capacity)
    fscale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if new_k.shape[2] == 1 and not is_causal:
        return replace_one(fmt, q, state, positions, new_k, new_v, mask, fscale, spec, site)
    return rewrite(fmt, q, state, positions, new_k, new_v, mask, is_causal, scale, fscale, spec, site, asl_store)


def replace_one(fmt, q, state: State, positions, new_k, new_v, mask, scale: float, spec: FixedCacheSpec,
                site: str) -> torch.Tensor:
    """A one-token step: the new token into the slot the policy frees (module docstring); SnapKV's, ASL's, H2O's and
    streaming's in one kernel on CUDA (``launch.slot_replace``; H2O's weights computed first, as the torch path
    computes them), the torch path (``choose_and_write``) otherwise."""
    rows = new_rows(fmt.storage, new_k, new_v)
    slots = {name: state[name] for name in rows}
    rule = slot_rule(fmt)

    def weights_of() -> torch.Tensor:
        fused = fused_step_weights(q, state, slots, positions, new_k, mask, scale, spec) if q.is_cuda else None
        if fused is not None:
            return fused
        return decode_candidates(fmt, q, state, slots, positions, new_k, mask, scale, spec, site).weights()

    kept = None if rule is None else launch.slot_replace(state, slots, rows, positions, mask, q.shape[1], q.shape[2],
                                                         NEVER, rule, weights_of)
    if kept is None:
        choose_and_write(fmt, q, state, slots, positions, new_k, rows, mask, scale, spec, site)
    if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        stats.set_last(site, "kept", spec.budget)
    return attend_slots(fmt.storage, q, slots, state["pos"], mask, scale, spec, kept)


def slot_rule(fmt) -> SlotRule | None:
    """The slots kernel's rule for ``fmt``'s decode step (``launch.slot_replace``), or None where it has none."""
    if isinstance(fmt, SnapKV):  # ASL's decode step is SnapKV's
        return SlotRule(recent=decode_recent(fmt.budget))
    if isinstance(fmt, HeavyHitters):
        return SlotRule(recent=fmt.recent, accumulates=True)
    if isinstance(fmt, Streaming):
        return SlotRule(sink=SINK, n_sink=fmt.n_sink)
    return None


def fused_step_weights(q, state: State, slots: State, positions, new_k, mask, scale: float,
                       spec: FixedCacheSpec) -> torch.Tensor | None:
    """H2O's step weights over the slots and the new token, [B, Hkv, budget + 1], by the fused scoring kernel where
    the slots hold keys in q's dtype (the general path's CUDA scoring, ``budgeted.use_fused_scoring``; the caller
    takes it on CUDA): one pass over the slot keys under the mask at the slots' positions (empty slots hidden,
    ``kept_mask``) and the new token's column; None where it does not apply (the torch path's weights then)."""
    if set(slots) != {"k", "v"} or slots["k"].dtype != q.dtype:
        return None
    pos = torch.cat([state["pos"], positions.view(1, 1, 1).expand(new_k.shape[0], new_k.shape[1], 1)], 2)
    return fused_weights(q, [KeySegment(slots["k"]), KeySegment(new_k)], pos, mask, scale, spec)


def fused_weights(q, segments: list[KeySegment], pos, mask, scale: float, spec: FixedCacheSpec, *,
                  mean: bool = False) -> torch.Tensor | None:
    """Weights of a decode step's candidates, fp32 [B, Hkv, C], by the fused scoring kernel over their keys in column
    ``segments``, under the model's mask at their positions ``pos`` [B, Hkv, C] (EMPTY entries hidden,
    ``kept_mask``); None where the kernel does not take the step."""
    columns = kept_mask(mask, pos, q.shape[1], q.shape[2], spec.capacity)
    return launch.candidate_weights(q, segments, columns, scale, mean=mean)


def decode_candidates(fmt, q, state: State, slots: State, positions, new_k, mask, scale: float, spec: FixedCacheSpec,
                      site: str) -> FixedCandidates:
    """A one-token step's candidates: the ``slots`` (the row sections of ``state``), then the new token (its keys
    only where the policy's decode scores read them: H2O)."""
    B, Hkv = new_k.shape[:2]
    new_pos = positions.view(1, 1, 1).expand(B, Hkv, 1)
    held = state["pos"] >= 0
    k = None
    if not isinstance(fmt, ReplacesInPlace):  # the policy's decode scores read every candidate's key (H2O)
        k = torch.cat([fmt.storage.dequantize(slots, spec.budget, q.dtype)[0], new_k], 2)
    old_score = state["score"]
    return FixedCandidates(
        q, k, None, {}, torch.cat([state["pos"], new_pos], 2),
        torch.cat([old_score, old_score.new_zeros(B, Hkv, 1)], 2),
        torch.cat([held & (old_score > NEVER),
                   visible_tokens(mask, False, q.shape[2], spec.capacity, new_pos, q.shape[1])], 2),
        mask, False, scale, 1, spec.capacity, False, False, site, written=positions[-1] + 1,
        real=torch.cat([held, torch.ones_like(held[..., :1])], 2),
        fresh=torch.cat([torch.zeros_like(held), torch.ones_like(held[..., :1])], 2))


def choose_and_write(fmt, q, state: State, slots: State, positions, new_k, rows: State, mask, scale: float,
                     spec: FixedCacheSpec, site: str) -> None:
    """The policy's scores over the ``slots`` (the row sections of ``state``) and the new token, the dropped
    candidate, and the new token's ``rows``, position and score written over it, in place; nothing of the token
    where it is dropped."""
    B, Hkv = new_k.shape[:2]
    budget = spec.budget
    new_pos = positions.view(1, 1, 1).expand(B, Hkv, 1)
    empty = state["pos"] < 0
    old_score = state["score"]
    c = decode_candidates(fmt, q, state, slots, positions, new_k, mask, scale, spec, site)
    score = fmt.score(c).masked_fill(~c.visible, NEVER)
    dropped = torch.where(empty.any(-1), empty.to(torch.int32).argmax(-1), weakest(fmt.selection_key(c, score), c.pos))
    slot = dropped.clamp(max=budget - 1)[..., None]
    keeps_new = (dropped < budget)[..., None]
    old_score.copy_(score[..., :budget])  # the kept old tokens' scores as the policy updated them
    for name, t in {**rows, "pos": new_pos, "score": score[..., budget:]}.items():
        put(state[name], slot, t, keeps_new)


def rewrite(fmt, q, state: State, positions, new_k, new_v, mask, is_causal: bool, scale, fscale: float,
            spec: FixedCacheSpec, site: str, asl_store) -> torch.Tensor:
    """A step of several tokens: select the top ``budget`` of slots and new tokens, rewrite the slots in position
    order, attend (module docstring)."""
    B, Hkv, n, _ = new_k.shape
    Hq, Lq, budget, capacity = q.shape[1], q.shape[2], spec.budget, spec.capacity
    rows = new_rows(fmt.storage, new_k, new_v)
    slots = {name: state[name] for name in rows}
    old_k, old_v = fmt.storage.dequantize(slots, budget, q.dtype)
    new_pos = positions.view(1, 1, n).expand(B, Hkv, n)
    held = state["pos"] >= 0
    pos = torch.cat([state["pos"], new_pos], 2)
    real = torch.cat([held, torch.ones_like(held[..., :1]).expand(B, Hkv, n)], 2)
    order = torch.where(real, pos, EMPTY_LAST).argsort(dim=-1, stable=True)  # position order, empty slots last
    visible = torch.cat([held & (state["score"] > NEVER),
                         visible_tokens(mask, False, Lq, capacity, new_pos, Hq)], 2)
    score_old = torch.cat([state["score"], state["score"].new_zeros(B, Hkv, n)], 2)
    c = FixedCandidates(
        q, take(torch.cat([old_k, new_k], 2), order), take(torch.cat([old_v, new_v], 2), order),
        {name: take(torch.cat([slots[name], rows[name]], 2), order) for name in rows}, take(pos, order),
        take(score_old, order), take(visible, order), mask, False, fscale, n, capacity, False, True, site,
        written=positions[-1] + 1, real=take(real, order),
        fresh=take(torch.cat([torch.zeros_like(held), real[..., budget:]], 2), order))
    static_prefill = is_causal or Lq > MAX_DECODE_QUERY_LEN
    first = None if static_prefill else causal_first(mask, positions)
    # the general path ranks ASL's layers at a prefill over a cache that dropped nothing yet (old length <= budget)
    active = (positions[0] <= budget) if static_prefill else first
    score, key = score_and_key(fmt, c, spec, asl_store, active)
    if not static_prefill:
        decode = dataclasses.replace(c, prefill=False)
        score_d, key_d = score_and_key(fmt, decode, spec, None, None)
        score, key = torch.where(first, score, score_d), torch.where(first, key, key_d)
    kept = keep_order(key, c.pos, c.real)[..., :budget]
    kept_real = take(c.real, kept)
    kept = kept.gather(-1, torch.where(kept_real, take(c.pos, kept), EMPTY_LAST).argsort(dim=-1, stable=True))
    out = exact_attention(q, c.k, c.v, kept_mask(mask, torch.where(c.real, c.pos, EMPTY), Hq, Lq, capacity), False,
                          scale, Hq != Hkv)
    for name, t in c.stored.items():
        state[name].copy_(take(t, kept))
    state["pos"].copy_(torch.where(take(c.real, kept), take(c.pos, kept), EMPTY))
    state["score"].copy_(take(score, kept))
    if not static_prefill:
        out = torch.where(first, out, attend_slots(fmt.storage, q, slots, state["pos"], mask, fscale, spec))
    if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        stats.set_last(site, "kept", budget)
    return out


def score_and_key(fmt, c: FixedCandidates, spec: FixedCacheSpec, asl_store, active):
    """(the candidates' new scores, NEVER where unattendable; their selection keys)."""
    if fmt.policy == "asl" and c.prefill:
        score = asl_score(fmt, c, SnapKV.score(fmt, c), spec, asl_store, active)
    else:
        score = fmt.score(c)
    score = score.masked_fill(~c.visible, NEVER)
    return score, fmt.selection_key(c, score)


def asl_score(fmt, c: FixedCandidates, snap: torch.Tensor, spec: FixedCacheSpec, store: torch.Tensor,
              active: torch.Tensor) -> torch.Tensor:
    """``asl.ASL.score`` at a prefill, its forward state in ``store`` (``asl_store_layout``) and the layer the
    spec's: the store changes only where ``active`` (a device bool)."""
    if store is None:
        raise ValueError("policy 'asl' on a fixed-capacity cache needs the cache's ASL store (PackedCache makes it)")
    st = packed.views(store, asl_store_layout(spec))
    C, layer = c.pos.shape[-1], spec.layer
    w = fmt.window_size(c)
    layer_score = c.window_scores(w, pool="avg", kernel=fmt.asl_kernel).sum(1)  # [B, C]: all heads
    layer_score = layer_score.masked_fill(~c.visible.any(1), -torch.inf)
    ring = st["ranks"][:, :, :C]
    here = ring[layer % fmt.span]
    here.copy_(torch.where(active, asl.token_ranks(layer_score), here))
    if layer < fmt.first_layer:
        return snap
    history = [ring[i % fmt.span] for i in range(max(0, layer - fmt.span + 1), layer + 1)]
    spread = asl.rank_spread(history, max(fmt.budget - w, 1), c.real.any(1))
    base, settled, chosen = st["base"], st["settled"], st["chosen"][:, :C]
    if layer == fmt.first_layer:
        new_base, new_settled, new_chosen = spread, torch.zeros_like(settled), torch.zeros_like(layer_score)
    else:
        newly = ~settled & (spread <= fmt.settle_ratio * base)  # <=: base 0 = settled already
        new_base, new_settled = base, settled | newly
        new_chosen = torch.where(newly[:, None], layer_score, chosen)
    base.copy_(torch.where(active, new_base, base))
    settled.copy_(torch.where(active, new_settled, settled))
    chosen.copy_(torch.where(active, new_chosen, chosen))
    picked = new_chosen.nan_to_num(neginf=torch.finfo(torch.float32).min)[:, None].expand_as(snap)
    return torch.where((active & new_settled)[:, None, None], picked, snap)


def read(spec: FixedCacheSpec):
    """The eager read of a budgeted cache: refused, with what to do instead."""
    raise RuntimeError(
        f"PackedCache(policy={spec.policy!r}) attends only inside a kvpass-compiled graph: the kept set is chosen "
        "with the query and the model's mask, which the cache's update does not see. Compile the whole forward "
        "(prefill included) with kvpass: model.forward = torch.compile(model.forward, backend='kvpass'), or "
        "kvpass.compile(model); or use the general path (no PackedCache: HF's DynamicCache with the options "
        "policy/budget)")
