"""kv_bits=8: int8 keys and values, one symmetric scale per token and KV head.

Per-token scales suit both keys and values at 8 bits (KIVI, Liu et al. 2024, and KVQuant report
int8 per-token as near-lossless); they also let a token be written once and never requantized,
which a growing cache needs. Scales are float32: 4 bytes per token and head for K and V each, 3% of
the int8 payload at D=128.
"""
from __future__ import annotations

import torch

from lowering.packed import Layout
from lowering.storage import State, register_scheme

QMAX = 127.0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float32 scale [...]) with x ~= q * scale, |q| <= 127."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1) / QMAX
    q = torch.round(x32 / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)).clamp(-QMAX, QMAX)
    return q.to(torch.int8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


@register_scheme(8)
class Int8:
    name = "int8, per-token per-head scales"

    def layout(self, batch, kv_heads, length, k_dim, v_dim, dtype) -> Layout:
        rows = (batch, kv_heads, length)
        return {"k": ((*rows, k_dim), torch.int8), "v": ((*rows, v_dim), torch.int8),
                "k_scale": (rows, torch.float32), "v_scale": (rows, torch.float32)}

    def append(self, old: State | None, old_length: int, new_k, new_v, out: State) -> None:
        if old is not None:
            for name in out:
                out[name][:, :, :old_length].copy_(old[name])
        for name, x in (("k", new_k), ("v", new_v)):
            q, scale = quantize_rows(x)
            out[name][:, :, old_length:].copy_(q)
            out[name + "_scale"][:, :, old_length:].copy_(scale)

    def dequantize(self, state: State, length: int, dtype):
        return (dequantize_rows(state["k"], state["k_scale"], dtype),
                dequantize_rows(state["v"], state["v_scale"], dtype))

    def decode_attention(self, q, state: State, length: int, attn_mask, scale):
        from lowering.reference import exact_attention

        k, v = self.dequantize(state, length, q.dtype)
        return exact_attention(q, k, v, attn_mask, False, scale, q.shape[1] != k.shape[1])
