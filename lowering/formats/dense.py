"""policy="full": every token kept, in the storage scheme's form.

Prefill-length queries attend over the dequantized old tokens plus the new ones at full precision
(prefill is compute-bound and dequantizes once, as KIVI does); decode-length queries go to the
scheme's fused decode attention over the packed cache, which then includes the new tokens.
"""
from __future__ import annotations

import torch

from lowering.formats import FormatSpec, register_format
from lowering.reference import exact_attention
from lowering.storage import State, StorageScheme

MAX_DECODE_QUERY_LEN = 16  # as lowering.ops: decode and speculative steps; longer queries are prefill


@register_format("full")
class Dense:
    def __init__(self, spec: FormatSpec, storage: StorageScheme):
        if spec.early_exit is not None:
            raise NotImplementedError("early_exit is not implemented yet (the early-termination issue)")
        self.spec, self.storage = spec, storage

    def layout(self, batch, kv_heads, length, k_dim, v_dim, dtype):
        return self.storage.layout(batch, kv_heads, length, k_dim, v_dim, dtype)

    def step(self, q, old: State | None, old_length: int, new_k, new_v, attn_mask, is_causal, scale, site: str,
             out: State) -> torch.Tensor:
        self.storage.append(old, old_length, new_k, new_v, out)
        length = old_length + new_k.shape[2]
        gqa = q.shape[1] != new_k.shape[1]
        # SDPA's is_causal aligns the query block top-left (with a longer cache, a 1-token query sees only
        # key 0); HF passes an explicit mask whenever there is a past. Follow SDPA exactly on that path.
        if q.shape[2] > MAX_DECODE_QUERY_LEN or is_causal:
            k, v = new_k, new_v
            if old is not None:
                old_k, old_v = self.storage.dequantize(old, old_length, q.dtype)
                k, v = torch.cat([old_k, new_k], dim=2), torch.cat([old_v, new_v], dim=2)
            return exact_attention(q, k, v, attn_mask, is_causal, scale, gqa)
        return self.storage.decode_attention(q, out, length, attn_mask, scale)
