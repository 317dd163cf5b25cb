"""One layer's cache step on kvpass's packed slots: the body of ``torch.ops.kvpass.cache_attention``.

Reads the model's cache (a slot, HF's empty start, or a plain full-precision cache), picks where the new
state goes (the slot's own buffer when it has room and is its last writer, else a new buffer laid out by
the format), runs the format's step and records the buffer's last writer (``lowering.core.packed``).
Fast paths on CUDA: a decode step appended in place (``CacheFormat.decode_in_place``) and a budgeted
format's decode step that writes the new token over the evicted one (``decode_replacing``).
"""
from __future__ import annotations

import functools

import torch

from lowering.core import packed, stats
from lowering.core.limits import MAX_DECODE_QUERY_LEN
from lowering.formats import build_format


def _old_length(past: torch.Tensor) -> int:
    """Tokens already cached: a slot's L, a plain full-precision cache's L, or 0 (HF's empty start)."""
    return past.shape[2] if past.dim() == 4 else 0


def _layout_of(fmt, q, new_k, new_v):
    """length -> the format's sections for this layer's sizes."""
    b, h, _, dk = new_k.shape
    return functools.partial(_layout, fmt, b, h, dk, new_v.shape[-1], q.dtype)


@functools.lru_cache(maxsize=4096)
def _layout(fmt, b, h, dk, dv, dtype, length):
    return fmt.layout(b, h, length, dk, dv, dtype)


@functools.lru_cache(maxsize=1024)
def _capacity_layout(fmt, b, h, dk, dv, dtype, cap):
    return packed.capacity_layout(functools.partial(_layout, fmt, b, h, dk, dv, dtype), cap)


def _sections(buffer: torch.Tensor, fmt, layout_of, length: int) -> dict[str, torch.Tensor]:
    """The sections of ``length`` tokens in ``buffer`` (laid out for their capacity where the format grows
    in place)."""
    if not getattr(fmt, "grows_in_place", False):
        return _views(buffer, layout_of(length))
    return packed.trimmed(_capacity_views(buffer, layout_of, packed.capacity(length)), layout_of(length))


def _capacity_views(buffer: torch.Tensor, layout_of, cap: int) -> dict[str, torch.Tensor]:
    """``views`` of a buffer laid out for ``cap`` tokens (``_views``)."""
    return _views(buffer, _capacity_layout(*layout_of.args, cap))


def _views(buffer: torch.Tensor, layout: packed.Layout) -> dict[str, torch.Tensor]:
    """``packed.views``, kept on the buffer tensor: a decode step on the same buffer and layout (appending
    in place, or replacing slots of a full hot set) reuses them instead of re-slicing every section (each
    view op costs the host microseconds, per layer and step). The views hold the buffer's storage, not the
    tensor object, so they go with it."""
    cached = getattr(buffer, "_kvpass_views", None)
    if cached is not None and (cached[0] is layout or cached[0] == layout):
        return cached[1]
    sections = packed.views(buffer, layout)
    buffer._kvpass_views = (layout, sections)
    return sections


def cache_attention(q: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, new_k: torch.Tensor,
                    new_v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None,
                    spec: str, site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cache update and attention in one op, for variants that store the cache their own way.

    past_k, past_v: what the model's cache held (a kvpass slot, HF's empty start, or a plain full-precision
    cache, which is converted); new_k, new_v [B, Hkv, n, D]: this step's tokens; q [B, Hq, Lq, D].
    Returns (attention output [B, Hq, Lq, Dv], a 1-element view of the new packed buffer, a 1-element
    marker buffer for the values slot); the graph wraps the buffers into slots
    (``lowering.core.packed.slot_view``; the slot's storage is the whole buffer) and writes them back.
    Formats that grow in place (``lowering.core.packed``) append into the past slot's buffer while it has room
    and the slot is its last writer; otherwise the old tokens are copied into a new buffer."""
    old_length = _old_length(past_k)
    fmt = build_format(spec)
    grows = getattr(fmt, "grows_in_place", False)
    layout_of = _layout_of(fmt, q, new_k, new_v)
    old, root = None, None
    if packed.is_slot(past_k):
        packed.slot_buffer(past_v)  # raises if the values slot was rebuilt outside kvpass
        if grows and packed.capacity(old_length) >= old_length + new_k.shape[2]:
            root = packed.growable_root(past_k, old_length)
        if root is not None and q.is_cuda:
            out = _decode_in_place(fmt, q, root, layout_of, old_length, new_k, new_v, attn_mask, is_causal, scale)
            if out is not None:
                stats.calls["packed_decode_in_place"] += 1
                return _finish(out, root, layout_of, old_length + new_k.shape[2], site)
        out = _replace_in_place(fmt, q, past_k, layout_of, old_length, new_k, new_v, attn_mask, is_causal, scale, site)
        if out is not None:
            return out
        if root is None:
            packed.check_current(past_k, old_length)
        old = _sections(packed.slot_buffer(past_k) if root is None else root, fmt, layout_of, old_length)
    elif past_k.dtype == torch.uint8 and old_length:
        packed.slot_buffer(past_k)  # a materialised copy of a slot (beam search reordering): raises, never guesses
    elif old_length:  # a full-precision cache filled before kvpass took over: store it in the new form
        new_k, new_v, old_length = torch.cat([past_k, new_k], 2), torch.cat([past_v, new_v], 2), 0
    length = old_length + new_k.shape[2]
    if root is None:
        root = torch.empty(packed.layout_nbytes(_capacity_layout(*layout_of.args, packed.capacity(length)) if grows
                                                else layout_of(length)), dtype=torch.uint8, device=q.device)
    out = fmt.step(q, old, old_length, new_k, new_v, attn_mask, is_causal, scale, site,
                   _sections(root, fmt, layout_of, length))
    return _finish(out, root, layout_of, length, site)


def _finish(out: torch.Tensor, root: torch.Tensor, layout_of, length: int, site: str):
    """The op's outputs once ``root`` holds ``length`` tokens, recorded as its last writer. The statistics
    keep the layout of ``length`` tokens (a cached object: its per-section bytes are counted only when
    ``kvpass.stats()`` asks, never on the step's path)."""
    packed.commit(root, length)
    stats.set_last(site, "cache_bytes", root.numel())
    stats.set_last(site, "layout", layout_of(length))
    stats.set_last(site, "tokens", length)
    return out.contiguous(), packed.alias(root)[:1], packed.marker_buffer(out.device)


def _decode_in_place(fmt, q, root, layout_of, old_length, new_k, new_v, attn_mask, is_causal, scale):
    """A decode step appended into ``root``'s spare capacity by the format's fused path
    (``decode_in_place``: append kernels and the decode kernel straight on the capacity sections, no
    per-step views), or None where the format or these inputs have none (the general path runs)."""
    decode = getattr(fmt, "decode_in_place", None)
    if decode is None or is_causal or q.shape[2] > MAX_DECODE_QUERY_LEN:
        return None
    sections = _capacity_views(root, layout_of, packed.capacity(old_length))
    return decode(q, sections, old_length, new_k, new_v, attn_mask, scale)


def _replace_in_place(fmt, q, past_k, layout_of, old_length, new_k, new_v, attn_mask, is_causal, scale, site):
    """A budgeted format's decode step on the slot's own buffer, the new token written over the evicted one
    (``lowering/formats/slot_replacement.py``; the slot must be its buffer's last writer), or None."""
    decode = getattr(fmt, "decode_replacing", None)
    root = packed.growable_root(past_k, old_length) if decode is not None else None
    if root is None:
        return None
    out = decode(q, _sections(root, fmt, layout_of, old_length), old_length, new_k, new_v, attn_mask, is_causal,
                 scale, site)
    if out is None:
        return None
    stats.calls["policy_replace_in_place"] += 1
    packed.mark_rewritten(root)
    return _finish(out, root, layout_of, old_length + new_k.shape[2], site)
