"""Decode attention over a packed (quantized) cache: the fused Triton kernel on CUDA, a reference elsewhere.

Every quantized storage scheme (``lowering/storage``) attends through ``packed_decode_attention``: the
scheme says how its sections map onto the kernel's operands (``scheme.kernel_operands``), the launcher
of ``lowering/decode_attention.py`` picks tiles and splits and launches the one split-KV kernel with the
scheme's ``KV_FORMAT`` (``lowering/kernels/decode_attention.py``), which dequantizes tiles in registers.
Off CUDA (or for inputs the kernel refuses) the reference dequantizes this layer's cache and calls torch's
SDPA, or for unrotated code * scale storage attends with the scales folded in: that is what CPU runs of
the backend take. Tests call ``kernel_decode_attention`` directly under
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import logging
import math

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
    """A scheme's ``decode_attention``: the fused kernel on CUDA, else its host twin for schemes storing code *
    scale in unrotated rows (``attend_over_products``), else dequantize this layer and run SDPA."""
    if q.is_cuda:
        reason = kernel_unsupported_reason(q, state, length, attn_mask, scheme)
        if reason is None:
            return kernel_decode_attention(scheme, q, state, length, attn_mask, scale).contiguous()
        log.debug("%s decode on the reference: %s", scheme.name, reason)
    if getattr(scheme, "kernel_attends_over_products", False) and not scheme.rotates(q.shape[-1]):
        return attend_over_products(scheme, q, state, length, attn_mask, scale)
    k, v = scheme.dequantize(state, length, q.dtype)
    return exact_attention(q, k, v, attn_mask, False, scale, q.shape[1] != k.shape[1])


def attend_over_products(scheme, q, state: dict, length: int, attn_mask, scale) -> torch.Tensor:
    """The host path of schemes storing code * per-token scale with unrotated rows (fp8; int8 at head dims
    that are not powers of two): q [B, Hq, Lq, D] over ``length`` tokens -> [B, Hq, Lq, D] in q's dtype,
    computed in fp32.

    As the kernel does, the key scales multiply the scores and the value scales the weights, so a decode
    step converts each cached code to fp32 once and never scales or copies the cache again. Rotated rows
    take ``dequantize`` instead: attending in the stored basis (the query rotated in, the output turned
    back) would be cheaper, but its fp32 rotations of the output differ from attention over the
    dequantized rows by more than the exact tolerance the host path is held to. A query row whose every
    key is masked gives zeros."""
    b, hq, lq, d = q.shape
    hkv = state["k_scale"].shape[1]
    query = q.float().reshape(b, hkv, hq // hkv * lq, d)  # [B, Hkv, G Lq, D]
    keys = scheme.code_rows(state, "k", length).float()  # [B, Hkv, L, D]
    softmax_scale = d ** -0.5 if scale is None else scale
    key_scale = state["k_scale"][:, :, :length].unsqueeze(-2) * softmax_scale  # [B, Hkv, 1, L]
    scores = (query @ keys.transpose(-1, -2) * key_scale).view(b, hq, lq, length)
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool
                  else scores + attn_mask.float())
    top = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - torch.where(top == -math.inf, 0.0, top))
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    weights = weights.view(b, hkv, hq // hkv * lq, length) * state["v_scale"][:, :, :length].unsqueeze(-2)
    out = weights @ scheme.code_rows(state, "v", length).float()  # [B, Hkv, G Lq, D]
    return out.view(b, hq, lq, d).to(q.dtype)
