"""Exact reference lowering: torch's own SDPA, on any device.

This is the path kvpass takes wherever its kernels don't apply (CPU, prefill-length queries, shapes a
kernel refuses), so the exact mode returns what the model would have computed without kvpass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """q [B, Hq, Lq, D], k [B, Hk, L, D], v [B, Hk, L, Dv] -> [B, Hq, Lq, Dv] (contiguous)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=enable_gqa)
    # The op's fake implementation promises a contiguous result (flash returns a transposed layout).
    return out.contiguous()
