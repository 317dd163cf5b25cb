"""policy="adore" on fixed-capacity buffers (placeholder until built)."""
from __future__ import annotations


def attention(q, buffer, positions, new_k, new_v, attn_mask, is_causal, scale, spec, site, asl_store=None):
    raise NotImplementedError("adore on fixed buffers")
