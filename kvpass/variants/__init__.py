"""Variants: what a matched attention site is rewritten into.

A variant is registered with :func:`register_variant` and provides ``applies(options) -> bool`` and
``rewrite(graph, site, options) -> str`` (the rewrite inserts kvpass ops in place of the site and
returns a short description of the lowering for the report). Later variants (quantized, compressed,
early exit) replace the cache update too: their op returns the new cache tensors, which take the place
of ``site.key_cache.written`` in the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import fx

from kvpass.options import KVPassOptions
from kvpass.sites import Site


@dataclass(frozen=True)
class Variant:
    name: str
    applies: Callable[[KVPassOptions], bool]
    rewrite: Callable[[fx.Graph, Site, KVPassOptions], str]


VARIANTS: dict[str, Variant] = {}


def register_variant(name: str, applies: Callable[[KVPassOptions], bool]):
    def decorate(rewrite):
        if name in VARIANTS:
            raise ValueError(f"variant {name!r} registered twice")
        VARIANTS[name] = Variant(name, applies, rewrite)
        return rewrite

    return decorate


def variant_for(options: KVPassOptions) -> Variant:
    for variant in VARIANTS.values():
        if variant.applies(options):
            return variant
    raise NotImplementedError(f"no kvpass variant implements {options}")


from kvpass.variants import exact, packed  # noqa: E402,F401  (exact first: variant_for takes the first that applies)
