"""policy="adore" on fixed-capacity buffers: the hot slots and a cold store laid out for the capacity.

ADORE (Zhang et al., Findings of ACL 2024, arXiv 2407.02328; kvpass's training-free form in
``lowering/formats/adore.py``) scores every token each step, hot and cold, and keeps the top ``budget``: released
hot tokens go to the cold store as int8 rows, cold tokens that win are rebuilt into the hot slots. On a
``FixedCacheSpec`` (``fixed_capacity.budget_layout``) the hot slots are kept in position order (empty slots last)
and the cold store is indexed by position (``cold_pos[p] = p`` while token p is cold, EMPTY otherwise, plus one
scratch row), so a step has fixed shapes whatever the length:

- candidates, in the general path's order: the hot slots, the cold store (int8 keys dequantized for scoring, as the
  general path's reference scoring does; a decode step on CUDA reads them as codes and scales in the fused scoring
  kernel, as the general path's CUDA scoring: ``fused_decode_weights``), the new tokens; empty entries are hidden from
  the softmax and never kept. Scores, selection key (max of score and this step's weight while decoding) and the
  protected newest tokens are the general format's (``Adore.score``'s rule, ``selection_key``, ``protected``);
- the kept set, the top ``budget`` (``keep_order``: ties by candidate index, as ``budgeted.select`` without
  positions), is written over the hot slots in position order (rebuilt cold rows converted to the hot form row by
  row, as the general path's lazy rebuild); released hot tokens and dropped new ones are scattered into the cold
  store at their positions (int8 rows of what attention read: the dequantized hot rows, the new rows at full
  precision; a token not released writes the scratch row), rebuilt ones leave it (EMPTY); every cold score decays;
- attention: a prefill-length step attends exactly over every candidate (cold rows dequantized), as the general
  path's prefill; a decode step over the hot slots (``fixed_budgeted.attend_slots``). A short first step under the
  plain causal mask is the general path's prefill (``fixed_budgeted.causal_first``; its keys are the decode
  keys there, since every candidate is new).

Cost per step: O(capacity) for the scores over the cold store (ADORE's rule reads every token), O(budget) rows
moved; no host read. Equal to the general path up to summation order (softmax sums over the empty entries' zeros).
"""
from __future__ import annotations

import torch

from lowering.core import packed, stats
from lowering.core.limits import MAX_DECODE_QUERY_LEN
from lowering.core.operands import KeySegment
from lowering.core.packed import MOVED_AS_BYTES
from lowering.core.reference import exact_attention
from lowering.formats import launch
from lowering.formats.budgeted import NEVER, BudgetedFormat, key_weights, take, visible_tokens
from lowering.formats.fixed_budgeted import (
    EMPTY_LAST,
    FixedCandidates,
    attend_slots,
    causal_first,
    fused_weights,
    general_format,
    keep_order,
    kept_mask,
    model_mask,
    new_rows,
)
from lowering.formats.fixed_capacity import EMPTY, FixedCacheSpec
from lowering.formats.snapkv import WINDOW
from lowering.storage import State
from lowering.storage.int8 import dequantize_rows

COLD_ROWS = ("cold_k", "cold_k_scale", "cold_v", "cold_v_scale")


def where_rows(pick: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` where ``pick`` [B, H, K], else of ``b`` (both [B, H, K, ...]; float8 chosen as bytes)."""
    if a.dtype in MOVED_AS_BYTES:
        return where_rows(pick, a.view(torch.uint8), b.view(torch.uint8)).view(a.dtype)
    return torch.where(pick.reshape(*pick.shape, *([1] * (a.dim() - 3))), a, b)


def scatter_rows(t: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """t[b, h, index[b, h, i]] = rows[b, h, i] in place; t [B, H, N, ...]."""
    index = index.reshape(*index.shape, *([1] * (t.dim() - 3))).expand_as(rows)
    t.scatter_(2, index, rows.to(t.dtype))


def fused_decode_weights(q, hot_k, state: State, new_k, pos, mask, scale: float,
                         spec: FixedCacheSpec) -> torch.Tensor | None:
    """A one-token step's mean weights over the candidates (the hot slots' keys ``hot_k`` in q's dtype, the cold
    store, the new token's ``new_k``), [B, Hkv, budget + cold rows + 1], by the fused scoring kernel: the cold keys
    read as their int8 codes and scales, never dequantized into a tensor (the general path's CUDA scoring,
    ``Adore.key_segments``); the mask at the candidates' positions ``pos`` with empty entries hidden
    (``kept_mask``). None where the kernel does not take the step (the torch path's weights then)."""
    segments = [KeySegment(hot_k), KeySegment(state["cold_k"], state["cold_k_scale"]), KeySegment(new_k)]
    return fused_weights(q, segments, pos, mask, scale, spec, mean=True)


def attention(q, buffer, positions, new_k, new_v, attn_mask, is_causal: bool, scale, spec: FixedCacheSpec,
              site: str, asl_store=None) -> torch.Tensor:
    """One ADORE step on the layer's buffer: new_k, new_v [B, Hkv, n, D] at ``positions`` (int64 [n]); returns
    q [B, Hq, Lq, D]'s attention -> [B, Hq, Lq, Dv] (module docstring)."""
    fmt = general_format(spec)
    storage, budget, capacity = fmt.storage, spec.budget, spec.capacity
    state = packed.views(buffer, spec.layout)
    B, Hkv, n, _ = new_k.shape
    Hq, Lq = q.shape[1], q.shape[2]
    mask = model_mask(q, attn_mask, is_causal, positions, capacity)
    fscale = 1.0 / (q.shape[-1] ** 0.5) if scale is None else float(scale)
    static_prefill = is_causal or Lq > MAX_DECODE_QUERY_LEN

    rows = new_rows(storage, new_k, new_v)
    slots = {name: state[name] for name in rows}
    hot_k, hot_v = storage.dequantize(slots, budget, q.dtype)
    new_pos = positions.view(1, 1, n).expand(B, Hkv, n)
    pos = torch.cat([state["pos"], state["cold_pos"], new_pos], 2)
    w = None
    if q.is_cuda and not static_prefill and n == 1:  # a decode step, scored on CUDA as the general path scores it
        w = fused_decode_weights(q, hot_k, state, new_k, pos, mask, fscale, spec)
    keys = None
    if w is None:
        keys = torch.cat([hot_k, dequantize_rows(state["cold_k"], state["cold_k_scale"], q.dtype), new_k], 2)
    hot_held, cold_held = state["pos"] >= 0, state["cold_pos"] >= 0
    fresh = torch.ones_like(hot_held[..., :1]).expand(B, Hkv, n)
    cold_n = cold_held.shape[-1]
    c = FixedCandidates(
        q, keys, None, {}, pos,
        torch.cat([state["score"], state["cold_score"], state["score"].new_zeros(B, Hkv, n)], 2),
        torch.cat([hot_held & (state["score"] > NEVER), cold_held & (state["cold_score"] > NEVER),
                   visible_tokens(mask, False, Lq, capacity, new_pos, Hq)], 2),
        mask, False, fscale, n, capacity, False, static_prefill, site, written=positions[-1] + 1,
        real=torch.cat([hot_held, cold_held, fresh], 2),
        fresh=torch.cat([torch.zeros_like(hot_held), torch.zeros_like(cold_held), fresh], 2))

    # scores (Adore.score): this step's mean weights (the reference path's where the kernel did not), the EMA for
    # old tokens
    if w is None:
        query_rows = slice(Lq - min(WINDOW, Lq), Lq) if static_prefill else slice(None)
        w = key_weights(q[:, :, query_rows], c.k, c.bias(query_rows), fscale, mean=True)
    score = torch.where(c.is_new, w, fmt.gamma * c.score + (1 - fmt.gamma) * w).masked_fill(~c.visible, NEVER)
    key = BudgetedFormat.selection_key(fmt, c, score if static_prefill else torch.maximum(score, w))
    kept = keep_order(key, None, c.real)[..., :budget]  # ties by candidate index
    kept_real = take(c.real, kept)
    kept = kept.gather(-1, torch.where(kept_real, take(c.pos, kept), EMPTY_LAST).argsort(dim=-1, stable=True))
    kept_real = take(c.real, kept)
    is_kept = torch.zeros_like(c.real).scatter_(-1, kept, kept_real)

    out = None
    if static_prefill or n > 1:  # the exact attention over every candidate (a prefill's)
        cold_v = dequantize_rows(state["cold_v"], state["cold_v_scale"], q.dtype)
        out = exact_attention(q, c.k, torch.cat([hot_v, cold_v, new_v], 2), kept_mask(mask, c.pos, Hq, Lq, capacity),
                              False, scale, Hq != Hkv)

    # the new hot set: old hot and new rows as stored, rebuilt cold rows converted (row by row, as the general path)
    in_cold = (kept >= budget) & (kept < budget + cold_n)
    local = torch.where(kept >= budget + cold_n, kept - cold_n, kept).clamp(max=budget + n - 1)
    cold_idx = (kept - budget).clamp(0, cold_n - 1)
    rebuilt = new_rows(storage, *(dequantize_rows(take(state[codes], cold_idx), take(state[scales], cold_idx), q.dtype)
                                  for codes, scales in (("cold_k", "cold_k_scale"), ("cold_v", "cold_v_scale"))))
    hot_rows = {name: where_rows(in_cold, rebuilt[name], take(torch.cat([slots[name], rows[name]], 2), local))
                for name in rows}

    # the cold store: scores decay, rebuilt tokens leave, released hot tokens and dropped new ones come in
    released = ~torch.cat([is_kept[..., :budget], is_kept[..., budget + cold_n:]], 2) & \
        torch.cat([hot_held, fresh], 2)
    moving_pos = torch.cat([state["pos"], new_pos], 2)
    to = torch.where(released, moving_pos, capacity)  # the scratch row for the tokens that stay hot
    ks, vs = launch.int8_rows(torch.cat([hot_k, new_k], 2)), launch.int8_rows(torch.cat([hot_v, new_v], 2))
    moving_score = torch.cat([score[..., :budget], score[..., budget + cold_n:]], 2)
    state["cold_score"].copy_(score[..., budget:budget + cold_n])
    state["cold_pos"].copy_(torch.where(cold_held & ~is_kept[..., budget:budget + cold_n], state["cold_pos"], EMPTY))
    for name, t in zip(COLD_ROWS, (*ks, *vs)):
        scatter_rows(state[name], to, t)
    scatter_rows(state["cold_pos"], to, torch.where(released, moving_pos, EMPTY))
    scatter_rows(state["cold_score"], to, moving_score)

    for name, t in hot_rows.items():
        state[name].copy_(t)
    state["pos"].copy_(torch.where(kept_real, take(c.pos, kept), EMPTY))
    state["score"].copy_(take(score, kept))
    if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        stats.set_last(site, "kept", budget)
    if static_prefill:
        return out
    decoded = attend_slots(storage, q, slots, state["pos"], mask, fscale, spec)
    return decoded if out is None else torch.where(causal_first(mask, positions), out, decoded)
