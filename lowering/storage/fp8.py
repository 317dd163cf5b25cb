"""kv_bits="fp8": float8 e4m3 keys and values, one fp32 scale per token and KV head.

Scale granularity: a per-head scale fixed at prefill (transformers' Fp8QuantizedLayer keeps one frozen
per-tensor scale) saturates at 448 x scale on any later token larger than the prefill's largest, and a
growing cache cannot rescale what it stored without requantizing it. A scale per token and head (still
"per head": each head has its own) is set when the token is written and never changes: 4 bytes per
token and head for K and V each, 3% of the 1-byte payload at D=128, the same layout cost as int8.
The scale maps the row's largest |x| to e4m3's largest finite value (448), as vLLM's dynamic scales do.

Round trip: e4m3 keeps 3 significand bits, so |x - x^| <= |x| / 16 for normal codes (|x| >= 2^-6 scale),
and <= 2^-10 scale in the subnormal range (spacing 2^-9); in terms of x^: max(|x^| / 15, 2^-10 scale)
plus ``rounding_slack``.
"""
from __future__ import annotations

import torch

from lowering.storage import State, register_scheme
from lowering.storage.int8 import Int8, rounding_slack

E4M3_MAX = 448.0


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (float8_e4m3fn codes [..., D], float32 scale [...]) with x ~= code * scale; the scale
    as ``lowering.storage.int8.quantize_rows`` takes it (largest |x| times fp32(1 / 448))."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1) * (1.0 / E4M3_MAX)
    # The clamp only catches x / scale landing a rounding above 448 (e4m3fn has no inf: it would be NaN).
    y = (x32 / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX)
    return y.to(torch.float8_e4m3fn), scale


@register_scheme("fp8")
class Fp8(Int8):
    name = "fp8 e4m3, per-token per-head scales"
    code_dtype = torch.float8_e4m3fn
    quantize = staticmethod(quantize_rows_fp8)
    code_max = E4M3_MAX  # the append kernel's e4m3 path (lowering/attention/append/kernel.py: FP8)
    # e4m3's error is relative to each element, not to the row's largest: a rotation would not shrink it.
    rotation = False

    def error_bound(self, state: State, length: int, dtype):
        k, v = self.dequantize(state, length, dtype)
        out = []
        for name, x in (("k", k), ("v", v)):
            scale = state[name + "_scale"].double().unsqueeze(-1)
            out.append(torch.maximum(x.abs().double() / 15, scale * 2.0 ** -10) + rounding_slack(x, dtype))
        return tuple(out)
