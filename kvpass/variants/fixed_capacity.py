"""Sites fed by a ``PackedCache``: attention straight over the packed fixed-capacity buffer.

The cache's ``update`` leaves, in the graph, ``fixed_cache_write`` (the new tokens into the buffer) and
``fixed_cache_read`` (the whole capacity dequantized to the model's dtype), whose keys and values reach the
attention, GQA-expanded or not. This rewrite replaces the read and the attention by one
``torch.ops.kvpass.fixed_cache_attention`` over the buffer under the model's mask
(``lowering/formats/fixed_capacity.py``:
the scheme's decode kernel on CUDA for decode-length queries), so the dequantized tensors leave the graph. Every
input has a shape fixed for the generation and the write positions are device tensors: the graph is
CUDA-graph capturable (``mode="reduce-overhead"``). A budgeted cache (``policy``, ``budget``) leaves no write
before its read (``fixed_budget_read``): the read and the attention become ``fixed_budget_attention``, which
writes, selects the kept tokens and attends (``lowering/formats/fixed_budgeted.py``).

The storage is the cache's (its ``kv_bits``), whatever the compile options say; the exact and packed variants
hand these sites here. A site that reads the cache through anything but the plain read (a transformed view,
other readers) keeps the read and gets the exact attention over it: correct, slower, reported.
"""
from __future__ import annotations

import torch
from torch import fx

from kvpass.cache_idioms import READ_OPS
from kvpass.options import KVPassOptions
from kvpass.patterns.fx_utils import op_name
from kvpass.sites import Site
from lowering.formats.fixed_capacity import parse_spec

IDIOM = "kvpass_packed_cache"
# Nodes between the read and the attention that die with the attention (views and GQA expansion).
_VIEWS = {"getitem", "expand", "reshape", "view", "unsqueeze", "contiguous", "repeat_interleave", "transpose"}


def unsupported_reason(site: Site) -> str | None:
    kc, vc = site.key_cache, site.value_cache
    if kc.idiom != IDIOM or vc.idiom != IDIOM:
        return f"keys from {kc.idiom!r}, values from {vc.idiom!r}"
    if kc.written.args[0] is not vc.written.args[0] or (kc.written.args[1], vc.written.args[1]) != (0, 1):
        return "keys and values come from different cache reads"
    if site.key is not kc.written or site.value is not vc.written:
        return "attention reads a transformed view of the cached keys or values"
    readers = kc.other_readers + vc.other_readers
    if readers:
        return f"the cached keys or values are also read by {', '.join(readers)}"
    return None


def rewrite_fixed_capacity(graph: fx.Graph, site: Site, options: KVPassOptions, fallback) -> str:
    """Rewrite a site fed by a PackedCache; ``fallback(graph, site, options) -> str``: the exact rewrite for
    sites this cannot take (a budgeted cache's read then raises when run: its kept set needs the query)."""
    reason = unsupported_reason(site)
    if reason is not None:
        return f"FALLBACK to exact over the dequantized cache ({fallback(graph, site, options)}): {reason}"
    m, read = site.match, site.key_cache.written.args[0]
    buffer, positions, new_k, new_v, spec = read.args[:5]
    s = parse_spec(spec)
    op, args = torch.ops.kvpass.fixed_cache_attention.default, (
        m.query, buffer, positions, new_k, new_v, m.attn_mask, m.is_causal, m.scale, spec)
    if s.early_exit is not None:  # the buffer holds block summaries: bounded attention, counted for the site
        op, args = torch.ops.kvpass.fixed_cache_early_exit_attention.default, (*args, site.module)
    if s.budgeted:  # write, selection and attention in one op (its read has no write before it)
        op, args = torch.ops.kvpass.fixed_budget_attention.default, (*args, site.module, read.args[5])
    with graph.inserting_before(m.output):
        fused = graph.call_function(op, args)
    fused.meta.update(m.output.meta)
    m.output.replace_all_uses_with(fused)
    graph.erase_node(m.output)
    for node in (m.key, m.value):
        _erase_dead_views(graph, node)
    exit_note = "" if s.early_exit is None else f", early exit at tolerance {s.early_exit:g}"
    if s.budgeted:
        exit_note = f", policy {s.policy} keeping {s.budget} tokens per KV head"
    ignored = "" if options.is_exact or str(options.kv_bits) == str(s.kv_bits) else \
        f"; options kv_bits={options.kv_bits!r} ignored: the cache's storage is used"
    if not options.is_exact and options.policy != s.policy:
        ignored += f"; options policy={options.policy!r} ignored: the cache's policy is used"
    name = "fixed_budget_attention" if s.budgeted else "fixed_cache_attention"
    return (f"{name} ({s.kv_bits}-bit storage of PackedCache, capacity {s.capacity}{exit_note}; "
            f"CUDA-graph capturable{ignored})")


def _erase_dead_views(graph: fx.Graph, node) -> None:
    """Erase ``node`` and its inputs up to the cache read (included) while nothing else uses them."""
    while isinstance(node, fx.Node) and not node.users and (
            op_name(node) in _VIEWS or op_name(node) in READ_OPS):
        inputs = [a for a in node.all_input_nodes]
        graph.erase_node(node)
        node = next((a for a in inputs if op_name(a) in _VIEWS or op_name(a) in READ_OPS), None)
