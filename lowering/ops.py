"""``torch.ops.kvpass.*``: the ops rewritten graphs call, registered with ``torch.library`` so Dynamo and
Inductor trace them through their fake implementations (dynamic sequence lengths included).

Registration only: each op's body is one call into the layer that implements it (exact attention:
``lowering.attention.exact``; a packed cache's step: ``lowering.formats.cache_step``). Importing this module
registers the ops; ``kvpass.variants`` imports it, and nothing else should.
"""
from __future__ import annotations

import torch

from lowering.attention import exact
from lowering.formats import cache_step


@torch.library.custom_op("kvpass::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              is_causal: bool, scale: float | None, enable_gqa: bool, use_kernel: bool, site: str = "") -> torch.Tensor:
    """Exact attention. q [B, Hq, Lq, D]; k, v [B, Hk, L, D] with Hk = Hq, or Hq % Hk == 0 and
    enable_gqa; attn_mask bool (True = attend) or additive, broadcastable to [B, Hq, Lq, L]; ``use_kernel``:
    the Triton decode kernel where it takes the inputs; ``site``: where k, v are the model's cache, the site's
    name (its bytes and tokens go to ``lowering.core.stats``, the figures a packed cache reports) -> [B, Hq, Lq, Dv]."""
    return exact.attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, use_kernel, site)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask, is_causal, scale, enable_gqa, use_kernel, site=""):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("kvpass::cache_attention", mutates_args=())
def cache_attention(q: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, new_k: torch.Tensor,
                    new_v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None,
                    spec: str, site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cache update and attention in one op, for variants that store the cache their own way.

    past_k, past_v: what the model's cache held (a kvpass slot, HF's empty start, or a plain full-precision
    cache, which is converted); new_k, new_v [B, Hkv, n, D]: this step's tokens; q [B, Hq, Lq, D]; spec: the
    ``FormatSpec`` as JSON; site: the attention module's path (statistics). Returns (attention output
    [B, Hq, Lq, Dv], a 1-element view of the new packed buffer, a 1-element marker buffer for the values
    slot); the graph wraps the buffers into slots and writes them back (``lowering.formats.cache_step``)."""
    return cache_step.cache_attention(q, past_k, past_v, new_k, new_v, attn_mask, is_causal, scale, spec, site)


@cache_attention.register_fake
def _cache_attention_fake(q, past_k, past_v, new_k, new_v, attn_mask, is_causal, scale, spec, site):
    return (q.new_empty((*q.shape[:-1], new_v.shape[-1])), q.new_empty(1, dtype=torch.uint8),
            q.new_empty(1, dtype=torch.uint8))
