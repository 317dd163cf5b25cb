"""Per-token 4-bit rows: the form int4 takes under a token policy (``kv_bits=4`` with ``policy``).

KIVI (``int4.py``) quantizes keys per channel over groups of 32 consecutive tokens, so a kept token
cannot be moved alone, which a budgeted cache must do on every eviction. Under a policy, keys and values
are instead quantized per token: asymmetric 4-bit over the row's D channels (scale and minimum in the
model's dtype, two codes per byte), the same code path as KIVI's values. KIVI (section 3) shows that
per-token keys lose more than per-channel ones at 2 bits, because a few key channels are large for
every token; at 4 bits the step is the row's range / 15, and the quality eval measures what it costs.
Bytes per token and head at D=128, bf16: 64 + 4 per tensor, 136 (512 for bf16). No fused kernel: decode
attention dequantizes the kept tokens (at most ``budget`` per head) and runs SDPA (``lowering.formats.launch``).

Not registered under a ``kv_bits`` value: ``Int4Kivi.per_token_variant`` points here and the budgeted
formats take it (``lowering.formats.budgeted``).
"""
from __future__ import annotations

import torch

from lowering.core.packed import Layout, copy_unless_same
from lowering.storage import State
from lowering.storage.int4_codes import dequantize_groups, pack_nibbles, quantize_groups, unpack_nibbles
from lowering.storage.int8 import rounding_slack


class Int4Rows:
    name = "int4 per-token rows (keys and values per token; int4 under a token policy)"

    def layout(self, batch, kv_heads, length, k_dim, v_dim, dtype) -> Layout:
        if k_dim % 2 or v_dim % 2:  # the codes' byte count must give the head dim back
            raise NotImplementedError(f"int4 under a token policy needs even head dims, got {k_dim}, {v_dim}")
        rows = (batch, kv_heads, length)
        return {"k": ((*rows, (k_dim + 1) // 2), torch.uint8), "v": ((*rows, (v_dim + 1) // 2), torch.uint8),
                "k_scale": (rows, dtype), "k_min": (rows, dtype), "v_scale": (rows, dtype), "v_min": (rows, dtype)}

    def append(self, old: State | None, old_length: int, new_k, new_v, out: State) -> None:
        if old is not None:
            for name in out:
                copy_unless_same(out[name][:, :, :old_length], old[name])
        for name, x in (("k", new_k), ("v", new_v)):
            codes, scale, low = quantize_groups(x, dim=3)
            out[name][:, :, old_length:].copy_(pack_nibbles(codes))
            out[name + "_scale"][:, :, old_length:].copy_(scale.squeeze(3))
            out[name + "_min"][:, :, old_length:].copy_(low.squeeze(3))

    def _dequantize(self, state: State, name: str, dim: int, dtype) -> torch.Tensor:
        return dequantize_groups(unpack_nibbles(state[name], dim), state[name + "_scale"][..., None],
                                 state[name + "_min"][..., None], dtype)

    def dequantize(self, state: State, length: int, dtype):
        return tuple(self._dequantize(state, n, 2 * state[n].shape[-1], dtype) for n in ("k", "v"))

    def error_bound(self, state: State, length: int, dtype):
        """Per-element bounds of |x - dequantized x| (float64): scale / 2 + roundings."""
        k, v = self.dequantize(state, length, dtype)
        return tuple(state[n + "_scale"].double()[..., None] / 2 + rounding_slack(x, dtype)
                     for n, x in (("k", k), ("v", v)))
