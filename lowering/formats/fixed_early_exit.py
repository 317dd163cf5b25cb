"""Early exit on fixed-capacity packed caches: block summaries kept in place, bounded attention over the capacity.

The ``early_exit`` option of the general path (``lowering/formats/dense.py``) on a ``FixedCacheSpec`` with
``early_exit`` set (``lowering/formats/fixed_capacity.py``). The layer's buffer holds, after the storage scheme's
sections, the summaries of ``lowering.attention.early_exit.bound`` for ``capacity / BLOCK`` blocks (``ee_kmin``,
``ee_kmax`` [B, Hkv, nb, Dk] in the model's dtype, ``ee_vmax`` [B, Hkv, nb] fp32): per block of ``BLOCK``
positions the elementwise key min / max and the largest value L2 norm of the rows written there, as attention
reads them (dequantized; int4's open group from its residual rows).

- ``update_summaries`` (after ``fixed_capacity.write``): recomputes from their stored rows the summaries of the
  ``window_groups(n, BLOCK)`` blocks from the block of the write's first position on (one block for a one-token
  step), chosen by a device index; rows at positions >= the length count as absent. Fixed shapes, no host
  read. Recomputing rather than merging is what int4 needs: a write that completes a key group turns that
  group's rows from the residual's full precision into codes (the group lies inside one block).
- ``attention``: a decode-length query runs ``bound.bounded_attention`` (the early-exit kernel on CUDA, its torch
  reference elsewhere) over the capacity's keys and values (16-bit: the stored sections; other schemes: the
  capacity dequantized, as the general path dequantizes its layer) under the model's mask with every position
  at or past the length hidden as well, planned with the device length (``plan_visits(written=...)``: the
  newest block first, token counts up to the length). Blocks past the length are hidden, so never read.
  Prefill-length queries attend exactly, as ``fixed_capacity.attention``. Blocks are counted in the site's
  stats as the general path counts them: ``B * Hkv * ceil(length / BLOCK)`` in all, and those read (device
  tensors, summed on the device; not while a CUDA graph is being recorded, nor on its replays).

For every scheme but int4 the summaries and the visiting plan are those of the general path over the same tokens,
so the output is too (up to the rounding of sums over more, hidden, keys); for int4 the general path keeps the
summaries of a completed group's earlier rows from its residual, these are the codes' (what attention reads).
"""
from __future__ import annotations

import math

import torch

from lowering.attention.early_exit import bound
from lowering.core import packed
from lowering.core.limits import MAX_DECODE_QUERY_LEN
from lowering.core.packed import MOVED_AS_BYTES
from lowering.formats import early_exit, fixed_capacity
from lowering.formats.fixed_capacity import FixedCacheSpec
from lowering.storage import State, token_blocks


def summaries(buffer: torch.Tensor, spec: FixedCacheSpec) -> State:
    """The summary sections of the layer's buffer (views)."""
    state = packed.views(buffer, spec.layout)
    return {name: state[name] for name in bound.SECTIONS}


def _take(section: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``section``'s entries ``index`` along dim 2 (float8 moved as bytes, exactly)."""
    if section.dtype in MOVED_AS_BYTES:
        return section.view(torch.uint8).index_select(2, index).view(section.dtype)
    return section.index_select(2, index)


def stored_rows(state: State, blocks: torch.Tensor, length: torch.Tensor, spec: FixedCacheSpec):
    """Keys and values of the summary blocks ``blocks`` (int64 [w]) as attention reads them: [B, Hkv, w * BLOCK, D]
    each in the model's dtype. The blocks' sections are gathered whole (a block is whole 16-token value blocks
    and whole key groups) into the scheme's layout of ``w * BLOCK`` tokens and dequantized; int4's open group
    (the one holding token ``length``) is read from the residual rows."""
    kinds, g = fixed_capacity.section_kinds(spec), spec.group
    device, span = blocks.device, blocks.numel() * bound.BLOCK

    def units(size: int) -> torch.Tensor:  # indices of the ``size``-token units making up the blocks
        per = bound.BLOCK // size
        return (blocks[:, None] * per + torch.arange(per, device=device)).flatten()

    tokens = units(1)
    layout = spec.layout_at(span)
    gathered = {name: _take(state[name], tokens) for name in kinds.rows}
    gathered.update({name: _take(state[name], units(token_blocks.TOKENS)) for name in kinds.blocks})
    gathered.update({name: _take(state[name], units(g)) for name in kinds.groups})
    for name, (shape, dtype) in layout.items():  # int4's residual sections: no rows at whole groups
        gathered.setdefault(name, torch.empty(shape, dtype=dtype, device=device))
    k, v = spec.scheme.dequantize(gathered, span, spec.torch_dtype)
    if g is not None:
        opened = length // g
        is_open = (tokens // g == opened)[:, None]
        rows = (tokens - opened * g).clamp(0, g - 2)
        k = torch.where(is_open, state["k_res"].index_select(2, rows).to(k.dtype), k)
        v = torch.where(is_open, state["v_res"].index_select(2, rows).to(v.dtype), v)
    return k, v, tokens


def update_summaries(buffer: torch.Tensor, positions: torch.Tensor, spec: FixedCacheSpec) -> None:
    """After tokens were written at ``positions`` (int64 [n], consecutive): the summaries of the blocks holding
    them, recomputed from the stored rows in place (``summary_layout``'s values: those of ``build_summaries`` over
    the first ``positions[-1] + 1`` stored rows). Nothing without early exit."""
    if spec.early_exit is None:
        return
    if spec.capacity % bound.BLOCK or bound.BLOCK % (spec.group or token_blocks.TOKENS):
        raise ValueError(f"early exit's {bound.BLOCK}-token blocks must split capacity {spec.capacity} and hold "
                         f"whole key groups and value blocks of {spec.scheme.name!r}")
    state = packed.views(buffer, spec.layout)
    window = fixed_capacity.window_groups(positions.numel(), bound.BLOCK)
    last = spec.capacity // bound.BLOCK - 1
    # a window past the capacity repeats the last block: the same rows, the same summaries written twice
    blocks = (positions[0] // bound.BLOCK + torch.arange(window, device=buffer.device)).clamp(max=last)
    length = positions[-1] + 1
    k, v, tokens = stored_rows(state, blocks, length, spec)
    B, H = k.shape[:2]
    held = tokens < length
    ee_dtype = state["ee_kmin"].dtype
    k = k.to(ee_dtype).view(B, H, window, bound.BLOCK, -1)
    absent = ~held.view(window, bound.BLOCK)[..., None]
    kmin = k.masked_fill(absent, math.inf).amin(3)
    kmax = k.masked_fill(absent, -math.inf).amax(3)
    norms = (v.float().norm(dim=-1) * bound.VNORM_ROUNDUP).view(B, H, window, bound.BLOCK)
    vmax = norms.masked_fill(absent[..., 0], 0.0).amax(3)
    for name, value in zip(bound.SECTIONS, (kmin, kmax, vmax)):
        state[name].index_copy_(2, blocks, value)


def held_mask(q: torch.Tensor, attn_mask, positions: torch.Tensor, capacity: int) -> torch.Tensor:
    """The model's mask (bool or additive, broadcastable to [B, Hq, Lq, capacity]; None: positional causal) with
    every position at or past the length hidden: the summaries hold no rows there."""
    if attn_mask is None:
        return fixed_capacity.positional_mask(q, positions, capacity)
    held = torch.arange(capacity, device=q.device) <= positions[-1]
    # -inf, not the dtype's min: a finite bias enters the bound's rounding margin, and would stop no read early
    return torch.where(held, attn_mask, False if attn_mask.dtype == torch.bool else -math.inf)


def attention(q, buffer, positions, new_k, new_v, attn_mask, is_causal, scale, spec: FixedCacheSpec,
              site: str) -> torch.Tensor:
    """q [B, Hq, Lq, D] over the cache (written already, this step's tokens included) -> [B, Hq, Lq, Dv]; a
    decode-length query by the bounded attention at ``spec.early_exit``, its blocks counted in ``site``'s stats."""
    if is_causal or q.shape[2] > MAX_DECODE_QUERY_LEN:
        return fixed_capacity.attention(q, buffer, positions, new_k, new_v, attn_mask, is_causal, scale, spec)
    if str(spec.kv_bits) == "16":  # the stored sections are the keys and values
        state = packed.views(buffer, spec.layout)
        k, v = state["k"], state["v"]
    else:
        k, v = fixed_capacity.read(buffer, positions, new_k, new_v, spec)
    length = positions[-1] + 1
    mask = held_mask(q, attn_mask, positions, spec.capacity)
    out, read, _ = bound.bounded_attention(q, k, v, summaries(buffer, spec), mask, scale, spec.early_exit,
                                           written=length)
    if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):  # a graph's statistic would be pool memory
        early_exit.count_blocks(site, q.shape[0] * spec.kv_heads * bound.num_blocks(length), read)
    return out.contiguous()
