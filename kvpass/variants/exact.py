"""The exact variant: the site becomes ``torch.ops.kvpass.attention``, numerically torch's SDPA.

On CUDA, decode-sized queries run kvpass's Triton split-KV kernel (reads each KV head once for all
its query heads, even where the model expanded K/V with ``repeat_kv``); elsewhere the op calls
torch's SDPA. The cache update is left as the model wrote it; the op records its bytes and tokens
(``kvpass.stats()``), so the exact mode has the figures a packed cache is compared with.
"""
from __future__ import annotations

import torch
from torch import fx

import lowering.ops  # noqa: F401  (registers torch.ops.kvpass.*)
from kvpass.options import KVPassOptions
from kvpass.sites import Site
from kvpass.variants import register_variant
from kvpass.variants.fixed_capacity import IDIOM as PACKED_CACHE_IDIOM
from kvpass.variants.fixed_capacity import rewrite_fixed_capacity


@register_variant("exact", applies=lambda options: options.is_exact)
def rewrite_exact(graph: fx.Graph, site: Site, options: KVPassOptions) -> str:
    if site.cache_idiom == PACKED_CACHE_IDIOM:  # a PackedCache brings its own storage
        return rewrite_fixed_capacity(graph, site, options, attend_exactly)
    return attend_exactly(graph, site, options)


def attend_exactly(graph: fx.Graph, site: Site, options: KVPassOptions) -> str:
    m = site.match
    with graph.inserting_before(m.output):
        new = graph.call_function(
            torch.ops.kvpass.attention.default,
            (m.query, site.key, site.value, m.attn_mask, m.is_causal, m.scale, site.enable_gqa,
             options.decode_kernel, site.module if site.cache_idiom != "none" else ""),
        )
    new.meta.update(m.output.meta)
    m.output.replace_all_uses_with(new)
    graph.erase_node(m.output)
    kernel = "Triton decode kernel on CUDA for Lq <= 16, else " if options.decode_kernel else ""
    return f"{kernel}torch SDPA"
