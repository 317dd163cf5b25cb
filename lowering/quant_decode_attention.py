"""Decode attention over a packed (quantized) cache: the fused Triton kernel on CUDA, a reference elsewhere.

Every quantized storage scheme (``lowering/storage``) attends through ``packed_decode_attention``: the
scheme says how its sections map onto the kernel's operands (``scheme.kernel_operands``), the launcher
of ``lowering/decode_attention.py`` picks tiles and splits and launches the one split-KV kernel with the
scheme's ``KV_FORMAT`` (``lowering/kernels/decode_attention.py``), which dequantizes tiles in registers.
Off CUDA (or for inputs the kernel refuses) the reference dequantizes this layer's cache and calls torch's
SDPA: that is what CPU runs of the backend take. Tests call ``kernel_decode_attention`` directly under
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import logging

import torch

from lowering.reference import exact_attention

log = logging.getLogger("kvpass.lowering")


def kernel_unsupported_reason(q: torch.Tensor, state: dict, length: int, attn_mask, scheme=None) -> str | None:
    """None when the fused kernel takes this query over a packed state of ``length`` tokens (and ``scheme``'s
    own ``kernel_refusal``, where it has one, does not refuse it)."""
    if not q.is_cuda and q.device.type != "cpu":
        return f"device {q.device.type}"
    try:
        from lowering.decode_attention import query_unsupported_reason
    except ImportError as e:  # triton missing
        return f"triton unavailable ({e})"
    codes = state["k"]
    if state["v"].shape[3] != codes.shape[3]:  # dim 3: channels (or bytes) also of token-blocked values
        return "keys and values have different head dims"
    refusal = getattr(scheme, "kernel_refusal", None)
    reason = None if refusal is None else refusal(q)
    if reason is not None:
        return reason
    return query_unsupported_reason(q, codes.shape[1], length, attn_mask)


def kernel_decode_attention(scheme, q: torch.Tensor, state: dict, length: int, attn_mask=None, scale=None, *,
                            out=None, config=None, **options) -> torch.Tensor:
    """The fused kernel: q [B, Hq, Lq, D] over ``length`` tokens of ``scheme``'s packed ``state`` ->
    [B, Hq, Lq, D] in q's dtype. ``options`` go to ``scheme.kernel_operands`` (aligned: ``tau``, ``stats``)."""
    reason = kernel_unsupported_reason(q, state, length, attn_mask, scheme)
    if reason is not None:
        raise ValueError(f"{scheme.name} decode kernel: {reason}")
    from lowering.decode_attention import launch

    # A scheme storing its rows rotated says so in its operands: the kernel rotates q and turns o back.
    return launch(q, scheme.kernel_operands(q, state, length, **options), attn_mask, scale, out=out, config=config)


def packed_decode_attention(scheme, q, state: dict, length: int, attn_mask, scale) -> torch.Tensor:
    """A scheme's ``decode_attention``: the fused kernel on CUDA, else dequantize this layer and run SDPA."""
    if q.is_cuda:
        reason = kernel_unsupported_reason(q, state, length, attn_mask, scheme)
        if reason is None:
            return kernel_decode_attention(scheme, q, state, length, attn_mask, scale).contiguous()
        log.debug("%s decode on the reference: %s", scheme.name, reason)
    k, v = scheme.dequantize(state, length, q.dtype)
    return exact_attention(q, k, v, attn_mask, False, scale, q.shape[1] != k.shape[1])
