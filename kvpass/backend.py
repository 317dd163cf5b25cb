"""The ``kvpass`` torch.compile backend: Dynamo's FX graph in, attention sites rewritten, Inductor out.

    graph -> find sites (patterns) -> analyse roles (sites, cache idioms) -> rewrite (variants) -> Inductor
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from torch import fx

from kvpass import _compat
from kvpass.options import parse_options
from kvpass.patterns import AttentionMatch, find_attention
from kvpass.patterns.fx_utils import module_path, op_name
from kvpass.report import LEFT, REWRITTEN, GraphRecord, SiteRecord, next_graph_id, record_graph
from kvpass.sites import analyse
from kvpass.variants import variant_for

# Nodes a rewrite leaves dead that are safe to delete (pure tensor math and views); anything else,
# in-place cache writes above all, stays even without users.
_PURE = {"getitem", "expand", "reshape", "view", "transpose", "matmul", "mul", "div", "add", "softmax", "to",
         "type", "dropout", "contiguous", "repeat_interleave", "float", "half", "bfloat16", "unsqueeze"}


def kvpass_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None,
                   mode: str | None = None):
    try:
        opts = parse_options(options)  # raises before anything is compiled
    except (ValueError, NotImplementedError) as error:
        raise _compat.through_dynamo(error) from None  # the user's ValueError, not BackendCompilerFailed
    start = time.perf_counter()
    graph_id = next_graph_id()
    record = GraphRecord(graph=graph_id, options=dict(options or {}))
    variant = variant_for(opts)
    for index, found in enumerate(find_attention(gm.graph)):
        if not isinstance(found, AttentionMatch):
            record.sites.append(SiteRecord(graph_id, index, module_path(found.node), found.pattern, "?", LEFT,
                                           reason=found.reason))
            continue
        site = analyse(found)
        notes = []
        if site.repeat_stripped > 1:
            notes.append(f"GQA expansion x{site.repeat_stripped} stripped")
        if site.key_cache.other_readers:
            notes.append("cache also read by " + ", ".join(site.key_cache.other_readers))
        lowering = variant.rewrite(gm.graph, site, opts)
        record.sites.append(SiteRecord(graph_id, index, site.module, found.pattern, site.cache_idiom, REWRITTEN,
                                       variant=variant.name, lowering=lowering, reason="; ".join(notes)))
    _erase_dead_pure_nodes(gm.graph)
    gm.graph.lint()
    gm.recompile()
    mode = mode or opts.mode
    if mode in CUDAGRAPH_MODES and any(r.variant == "packed" and r.lowering.startswith("cache_attention")
                                       for r in record.sites):
        record.sites = [_with_note(r, NO_CUDAGRAPHS_NOTE.format(mode=mode)) if r.variant == "packed" else r
                        for r in record.sites]
        mode = None  # Inductor's default mode for this graph (named in the report)
    record.compile_seconds = time.perf_counter() - start
    record_graph(record)
    if opts.compiler == "eager":
        return _compat.eager_compile(gm, example_inputs)
    return _compat.inductor_compile(gm, example_inputs, mode)


# Inductor modes that capture CUDA graphs.
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
NO_CUDAGRAPHS_NOTE = (
    "mode={mode!r} not applied (Inductor's default mode instead): a packed cache's slots are new tensors "
    "of a new length every step and its buffer is allocated inside the op when it grows, so CUDA graphs "
    "would record a new graph each step")


def _with_note(record: SiteRecord, note: str) -> SiteRecord:
    return dataclasses.replace(record, reason="; ".join(filter(None, [record.reason, note])))


def _erase_dead_pure_nodes(graph: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if node.op in ("call_function", "call_method") and not node.users and op_name(node) in _PURE:
            graph.erase_node(node)
