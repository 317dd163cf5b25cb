"""The packed-cache variant: quantized storage, compressed caches, early exit (any non-exact option).

The site's cache update and its attention become one op, ``torch.ops.kvpass.cache_attention``, that
reads the layer's packed buffer, appends this step's keys and values in the configured form and
attends. What the model's cache receives back in place of the concatenated keys and values are slots
(``lowering.core.packed``): tensors shaped like the full-precision cache, with no memory of their own,
whose storage is the packed buffer. The model's code, HF generate and ``get_seq_length`` are unchanged.

Sites this cannot rewrite get the exact variant, with the reason in the report: only a cache the
model grows by concatenation (HF DynamicCache) is replaced, because its tensors are rebuilt every step;
a StaticCache or a module buffer is allocated by the model at full precision, so storing it packed
would save nothing and would write bytes the model does not expect.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

import lowering.ops  # noqa: F401  (registers torch.ops.kvpass.*)
from kvpass.options import KVPassOptions
from kvpass.sites import Site
from kvpass.variants import register_variant
from kvpass.variants.exact import attend_exactly, rewrite_exact
from kvpass.variants.fixed_capacity import IDIOM as PACKED_CACHE_IDIOM
from kvpass.variants.fixed_capacity import rewrite_fixed_capacity
from lowering.core.packed import slot_view
from lowering.formats import FormatSpec
from lowering.formats.early_exit import resolve_tolerance

REPLACEABLE_CACHES = ("dynamic_cache_cat",)


def cache_slot(buffer: torch.Tensor, past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The slot written back to the model's cache: [B, Hkv, L_past + n, D], storage ``buffer``."""
    length = (past.shape[2] if past.dim() == 4 else 0) + new.shape[2]
    return slot_view(buffer, (new.shape[0], new.shape[1], length, new.shape[3]))


def unsupported_reason(site: Site) -> str | None:
    for role, cache, read in (("keys", site.key_cache, site.key), ("values", site.value_cache, site.value)):
        if cache.idiom not in REPLACEABLE_CACHES:
            return (f"{role} come from cache idiom {cache.idiom!r}; packed caches replace only "
                    f"{', '.join(REPLACEABLE_CACHES)} (a preallocated full-precision buffer cannot shrink)")
        if cache.written is not read:
            return f"attention reads a transformed view of the cached {role}"
        if cache.other_readers:
            return f"the cached {role} are also read by {', '.join(cache.other_readers)}"
    return None


def spec_of(options: KVPassOptions) -> str:
    return FormatSpec(kv_bits=options.kv_bits, policy=options.policy, budget=options.budget,
                      early_exit=options.early_exit, replace_in_place=options.replace_in_place,
                      asl_layers=None if options.asl_layers is None else tuple(options.asl_layers)).to_json()


@register_variant("packed", applies=lambda options: not options.is_exact)
def rewrite_packed(graph: fx.Graph, site: Site, options: KVPassOptions) -> str:
    if site.cache_idiom == PACKED_CACHE_IDIOM:  # a PackedCache brings its own storage
        return rewrite_fixed_capacity(graph, site, options, attend_exactly)
    reason = unsupported_reason(site)
    if reason is not None:
        return f"FALLBACK to exact ({rewrite_exact(graph, site, options)}): {reason}"
    m, kc, vc = site.match, site.key_cache, site.value_cache
    with graph.inserting_before(m.output):
        fused = graph.call_function(
            torch.ops.kvpass.cache_attention.default,
            (m.query, kc.past, vc.past, kc.new, vc.new, m.attn_mask, m.is_causal, m.scale, spec_of(options),
             site.module),
        )
        out = graph.call_function(operator.getitem, (fused, 0))
    out.meta.update(m.output.meta)
    m.output.replace_all_uses_with(out)
    graph.erase_node(m.output)
    for cache, index in ((kc, 1), (vc, 2)):
        with graph.inserting_after(out):
            buffer = graph.call_function(operator.getitem, (fused, index))
        with graph.inserting_after(buffer):
            slot = graph.call_function(cache_slot, (buffer, cache.past, cache.new))
        cache.written.replace_all_uses_with(slot)
        graph.erase_node(cache.written)
    tolerance = resolve_tolerance(options.early_exit)
    exit_note = "" if tolerance is None else f", early exit at tolerance {tolerance:g}"
    return f"cache_attention ({options.kv_bits}-bit storage, policy {options.policy}{exit_note})"
