"""kv_bits=16: keys and values kept as the model computed them (the base other variants add to)."""
from __future__ import annotations

from lowering.core.packed import Layout, copy_unless_same
from lowering.storage import State, register_scheme


@register_scheme(16)
class FullPrecision:
    name = "full precision"

    def layout(self, batch, kv_heads, length, k_dim, v_dim, dtype) -> Layout:
        return {"k": ((batch, kv_heads, length, k_dim), dtype), "v": ((batch, kv_heads, length, v_dim), dtype)}

    def append(self, old: State | None, old_length: int, new_k, new_v, out: State) -> None:
        if old is not None:
            copy_unless_same(out["k"][:, :, :old_length], old["k"])
            copy_unless_same(out["v"][:, :, :old_length], old["v"])
        out["k"][:, :, old_length:].copy_(new_k)
        out["v"][:, :, old_length:].copy_(new_v)

    def dequantize(self, state: State, length: int, dtype):
        return state["k"].to(dtype), state["v"].to(dtype)
