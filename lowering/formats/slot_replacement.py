"""A budgeted format's decode step that writes the new token over the evicted one, in place.

The general step (``BudgetedFormat.step``) rebuilds the hot set every step: it dequantizes the kept rows,
concatenates the new token, sorts, and gathers every section into a new buffer, O(budget) rows moved and
allocated per layer and step. Once the hot set is full, a one-token decode step drops exactly one of the
budget + 1 candidates. For the policies whose decode scores come from per-token metadata alone (stored
score, position, visibility: ``streaming``, ``snapkv``, ``asl``; they take ``ReplacesInPlace``) the choice
needs no rows: the dropped candidate is the one the general step's order puts last (the smallest key; equal
keys: the highest position, as ``budgeted.select`` orders them), and the new token's rows go into its slot, or
nowhere when the new token is the one dropped. Rows written: one per (batch row, KV head) and section.

Slots then hold their tokens out of position order. Nothing reads them in order: the mask is gathered at
``pos``, selection breaks ties by position (``budgeted.select``), and attention is a sum over the kept
set, so the kept set is the general step's and the output equals it up to summation order.

The buffer is the slot's own (``lowering.formats.cache_step``: only when the slot is its buffer's last writer,
``packed.growable_root``); an older slot of the same buffer no longer reads what it held, so the buffer is
marked (``packed.mark_rewritten``) and such a slot raises instead of reading rewritten rows.

Cost per layer and step: scores and keys over budget + 1 metadata entries, one reduction, one masked
scatter of a row per (batch row, KV head) in each section, and the scheme's decode attention over the
kept tokens; no allocation of the hot set, no sort.
"""
from __future__ import annotations

import math

import torch

from lowering.core import stats
from lowering.core.limits import MAX_DECODE_QUERY_LEN
from lowering.core.packed import MOVED_AS_BYTES
from lowering.formats import launch
from lowering.formats.budgeted import NEVER, Candidates, take, visible_column
from lowering.storage import State


def weakest(key: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Index [B, H] of the candidate the general step drops when it keeps all but one: the smallest key,
    of equal ones the highest position (``budgeted.select`` keeps lower positions first)."""
    low = key.amin(-1, keepdim=True)
    return torch.where(key == low, pos, -1).argmax(-1)


def put(t: torch.Tensor, slot: torch.Tensor, rows: torch.Tensor, write: torch.Tensor) -> None:
    """t[b, h, slot[b, h]] = rows[b, h, 0] where ``write`` [B, H, 1], in place; t [B, H, N, ...]."""
    if t.dtype in MOVED_AS_BYTES:  # no scatter kernel for float8: move the bytes
        return put(t.view(torch.uint8), slot, rows.view(torch.uint8), write)
    write = write.reshape(*write.shape, *([1] * (t.dim() - 3)))
    src = torch.where(write, rows.to(t.dtype), take(t, slot))
    t.scatter_(2, slot.reshape(*slot.shape, *([1] * (t.dim() - 3))).expand_as(src), src)


def overwrite(t: torch.Tensor, index: tuple, rows: torch.Tensor) -> None:
    """t[b, h, slot[b, h]] = rows[b, h, 0] for every (b, h), in place; ``index`` = (b, h, slot) broadcastable
    to [B, H]."""
    if t.dtype in MOVED_AS_BYTES:
        return overwrite(t.view(torch.uint8), index, rows.view(torch.uint8))
    t[index] = rows[:, :, 0].to(t.dtype)


def decode_replacing(fmt, q, state: State, old_length: int, new_k, new_v, attn_mask, is_causal, scale,
                     site: str) -> torch.Tensor | None:
    """A one-token decode step of ``fmt`` on a full hot set, the new token written over the evicted one in
    ``state``, or None where the general step must run (the spec's ``replace_in_place``: None = on CUDA)."""
    enabled = q.is_cuda if fmt.spec.replace_in_place is None else fmt.spec.replace_in_place
    if not (enabled and new_k.shape[2] == 1 and not is_causal
            and q.shape[2] <= MAX_DECODE_QUERY_LEN and old_length >= fmt.budget):
        return None
    return replace_step(fmt, q, state, old_length, new_k, new_v, attn_mask, scale, site)


def replace_step(fmt, q, state: State, old_length: int, new_k, new_v, attn_mask, scale, site: str) -> torch.Tensor:
    """The decode step of ``fmt`` (a ``BudgetedFormat`` whose hot set is full) on its own ``state``: score,
    drop one candidate, write the new token over it, attend over the kept tokens."""
    B, Hkv = new_k.shape[:2]
    budget = fmt.budget
    length = old_length + 1
    new_rows = {name: torch.empty(shape, dtype=dt, device=q.device)
                for name, (shape, dt) in fmt.storage.layout(B, Hkv, 1, new_k.shape[-1], new_v.shape[-1],
                                                            q.dtype).items()}
    launch.append(fmt.storage, None, 0, new_k, new_v, new_rows)
    new_pos = torch.full((B, Hkv, 1), old_length, dtype=torch.long, device=q.device)
    old_score = state["score"]
    visible_new = visible_column(attn_mask, q.shape[2], length, old_length, Hkv, q.shape[1], q.device).expand(B, Hkv, 1)
    c = Candidates(q, None, None, {}, torch.cat([state["pos"].long(), new_pos], 2),
                   torch.cat([old_score, old_score.new_zeros(B, Hkv, 1)], 2),
                   torch.cat([old_score > NEVER, visible_new], 2),
                   attn_mask, False, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale), 1, length, False,
                   False, site)
    score = fmt.score(c).masked_fill(~c.visible, NEVER)
    dropped = weakest(fmt.selection_key(c, score), c.pos)
    slot = dropped.clamp(max=budget - 1)[..., None]
    keeps_new = (dropped < budget)[..., None]
    old_score.copy_(score[..., :budget])  # the kept old tokens' scores as the policy updated them
    writes = {**new_rows, "pos": new_pos, "score": score[..., budget:]}
    if not q.is_cuda and bool(keeps_new.all()):  # host tensors: the flag is read without a synchronisation
        index = (torch.arange(B, device=q.device)[:, None], torch.arange(Hkv, device=q.device), slot[..., 0])
        for name, rows in writes.items():
            overwrite(state[name], index, rows)
    else:
        for name, rows in writes.items():
            put(state[name], slot, rows, keeps_new)
    stats.add(site, "evicted", B * Hkv)
    stats.set_last(site, "kept", budget)
    return fmt.attend_kept(q, {name: state[name] for name in new_rows}, state["pos"], budget, length, attn_mask,
                           scale, site)


class ReplacesInPlace:
    """Mixin of the budgeted formats whose decode scores come from per-token metadata alone (score, position,
    visibility): their full hot sets decode in place (``cache_step`` finds ``decode_replacing``)."""

    def decode_replacing(self, q, state: State, old_length: int, new_k, new_v, attn_mask, is_causal, scale,
                         site: str) -> torch.Tensor | None:
        """The in-place decode step on ``state`` (the slot's own sections), or None (module docstring)."""
        return decode_replacing(self, q, state, old_length, new_k, new_v, attn_mask, is_causal, scale, site)
