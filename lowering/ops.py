"""``torch.ops.kvpass.*``: the ops rewritten graphs call, registered with ``torch.library`` so Dynamo and
Inductor trace them through their fake implementations (dynamic sequence lengths included)."""
from __future__ import annotations

import functools
import logging
from collections import Counter

import torch

from lowering.reference import exact_attention

log = logging.getLogger("kvpass.lowering")

# Decode and speculative-decoding steps (few query tokens) take the split-KV kernel; longer queries
# (prefill) are compute-bound and torch's flash/cuDNN kernels already serve them well.
MAX_KERNEL_QUERY_LEN = 16

# Run-time counts of which lowering served each call ("triton_decode", "torch_sdpa", and
# "torch_sdpa: <why not the kernel>" on CUDA). Plain dict updates: noise next to a kernel launch; not
# updated on CUDA-graph replays, which re-run the recorded kernels without Python.
calls: Counter = Counter()


def _kernel_reason(q, k, v, attn_mask, is_causal) -> str | None:
    """None when the Triton decode kernel takes these inputs, else why not."""
    if not q.is_cuda:
        return "not on CUDA"
    if q.shape[-2] > MAX_KERNEL_QUERY_LEN:
        return f"query length {q.shape[-2]} > {MAX_KERNEL_QUERY_LEN} (prefill)"
    try:
        from lowering.decode_attention import decode_attention_unsupported_reason
    except ImportError as e:  # triton missing
        return f"triton unavailable ({e})"
    return decode_attention_unsupported_reason(q, k, v, attn_mask, is_causal)


@torch.library.custom_op("kvpass::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              is_causal: bool, scale: float | None, enable_gqa: bool, use_kernel: bool) -> torch.Tensor:
    """Exact attention. q [B, Hq, Lq, D]; k, v [B, Hk, L, D] with Hk = Hq, or Hq % Hk == 0 and
    enable_gqa; attn_mask bool (True = attend) or additive, broadcastable to [B, Hq, Lq, L]."""
    if use_kernel and (enable_gqa or q.shape[1] == k.shape[1]):
        reason = _kernel_reason(q, k, v, attn_mask, is_causal)
        if reason is None:
            from lowering.decode_attention import decode_attention

            mask = None if attn_mask is None else attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            calls["triton_decode"] += 1
            return decode_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal).contiguous()
        if q.is_cuda:
            calls[f"torch_sdpa: {reason}"] += 1
        log.debug("kvpass::attention on torch SDPA: %s", reason)
    calls["torch_sdpa"] += 1
    return exact_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask, is_causal, scale, enable_gqa, use_kernel):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _old_length(past: torch.Tensor) -> int:
    """Tokens already cached: a slot's L, a plain full-precision cache's L, or 0 (HF's empty start)."""
    return past.shape[2] if past.dim() == 4 else 0


def _format(spec: str):
    from lowering.formats import build_format

    return build_format(spec)


def _layout_of(fmt, q, new_k, new_v):
    """length -> the format's sections for this layer's sizes."""
    b, h, _, dk = new_k.shape
    return functools.partial(_layout, fmt, b, h, dk, new_v.shape[-1], q.dtype)


@functools.lru_cache(maxsize=4096)
def _layout(fmt, b, h, dk, dv, dtype, length):
    return fmt.layout(b, h, length, dk, dv, dtype)


@functools.lru_cache(maxsize=1024)
def _capacity_layout(fmt, b, h, dk, dv, dtype, cap):
    from lowering import packed

    return packed.capacity_layout(functools.partial(_layout, fmt, b, h, dk, dv, dtype), cap)


def _sections(buffer: torch.Tensor, fmt, layout_of, length: int) -> dict[str, torch.Tensor]:
    """The sections of ``length`` tokens in ``buffer`` (laid out for their capacity where the format grows
    in place)."""
    from lowering import packed

    if not getattr(fmt, "grows_in_place", False):
        return packed.views(buffer, layout_of(length))
    return packed.trimmed(_capacity_views(buffer, layout_of, packed.capacity(length)), layout_of(length))


def _capacity_views(buffer: torch.Tensor, layout_of, cap: int) -> dict[str, torch.Tensor]:
    """``views`` of a buffer laid out for ``cap`` tokens, kept on the buffer tensor: a decode step that
    appends in place reuses them instead of re-slicing every section (each view op costs the host
    microseconds, per layer and step). The views hold the buffer's storage, not the tensor object, so
    they go with it."""
    from lowering import packed

    layout = _capacity_layout(*layout_of.args, cap)
    key = tuple(layout.items())
    cached = getattr(buffer, "_kvpass_views", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    sections = packed.views(buffer, layout)
    buffer._kvpass_views = (key, sections)
    return sections


@torch.library.custom_op("kvpass::cache_attention", mutates_args=())
def cache_attention(q: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, new_k: torch.Tensor,
                    new_v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None,
                    spec: str, site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cache update and attention in one op, for variants that store the cache their own way.

    past_k, past_v: what the model's cache held (a kvpass slot, HF's empty start, or a plain full-precision
    cache, which is converted); new_k, new_v [B, Hkv, n, D]: this step's tokens; q [B, Hq, Lq, D].
    Returns (attention output [B, Hq, Lq, Dv], a 1-element view of the new packed buffer, a 1-element
    marker buffer for the values slot); the graph wraps the buffers into slots
    (``lowering.packed.slot_view``; the slot's storage is the whole buffer) and writes them back.
    Formats that grow in place (``lowering.packed``) append into the past slot's buffer while it has room
    and the slot is its last writer; otherwise the old tokens are copied into a new buffer."""
    from lowering import packed, stats

    old_length = _old_length(past_k)
    fmt = _format(spec)
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
                calls["packed_decode_in_place"] += 1
                return _finish(out, root, old_length + new_k.shape[2], site)
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
    return _finish(out, root, length, site)


def _finish(out: torch.Tensor, root: torch.Tensor, length: int, site: str):
    """The op's outputs once ``root`` holds ``length`` tokens, recorded as its last writer."""
    from lowering import packed, stats

    packed.commit(root, length)
    stats.set_last(site, "cache_bytes", root.numel())
    stats.set_last(site, "tokens", length)
    return out.contiguous(), packed.alias(root)[:1], packed.marker_buffer(out.device)


def _decode_in_place(fmt, q, root, layout_of, old_length, new_k, new_v, attn_mask, is_causal, scale):
    """A decode step appended into ``root``'s spare capacity by the format's fused path
    (``decode_in_place``: append kernels and the decode kernel straight on the capacity sections, no
    per-step views), or None where the format or these inputs have none (the general path runs)."""
    from lowering import packed

    decode = getattr(fmt, "decode_in_place", None)
    if decode is None or is_causal or q.shape[2] > MAX_KERNEL_QUERY_LEN:
        return None
    sections = _capacity_views(root, layout_of, packed.capacity(old_length))
    return decode(q, sections, old_length, new_k, new_v, attn_mask, scale)


def _replace_in_place(fmt, q, past_k, layout_of, old_length, new_k, new_v, attn_mask, is_causal, scale, site):
    """A budgeted format's decode step on the slot's own buffer, the new token written over the evicted one
    (``lowering/slot_replacement.py``; the slot must be its buffer's last writer), or None."""
    from lowering import packed

    decode = getattr(fmt, "decode_replacing", None)
    root = packed.growable_root(past_k, old_length) if decode is not None else None
    if root is None:
        return None
    out = decode(q, _sections(root, fmt, layout_of, old_length), old_length, new_k, new_v, attn_mask, is_causal,
                 scale, site)
    if out is None:
        return None
    calls["policy_replace_in_place"] += 1
    packed.mark_rewritten(root)
    return _finish(out, root, old_length + new_k.shape[2], site)


@cache_attention.register_fake
def _cache_attention_fake(q, past_k, past_v, new_k, new_v, attn_mask, is_causal, scale, spec, site):
    return (q.new_empty((*q.shape[:-1], new_v.shape[-1])), q.new_empty(1, dtype=torch.uint8),
            q.new_empty(1, dtype=torch.uint8))


import lowering.fixed_capacity  # noqa: E402,F401  (registers torch.ops.kvpass.fixed_cache_*)
