"""Attention patterns: each module recognises one spelling of attention in a Dynamo FX graph.

A pattern is a function ``match(node) -> AttentionMatch | Unrewritable | None`` registered with
:func:`register_pattern`. It returns None when ``node`` is not where that spelling of attention ends,
an :class:`AttentionMatch` with the roles (query, key, value, mask, causal flag, scale) when it is, and
:class:`Unrewritable` with a reason when it is attention that kvpass must leave alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

from torch import fx


@dataclass
class AttentionMatch:
    pattern: str
    output: fx.Node  # the node whose value is attention's output [B, Hq, Lq, Dv]
    query: fx.Node  # [B, Hq, Lq, D]
    key: fx.Node  # [B, Hk, L, D] (Hk = Hq, or Hkv with enable_gqa)
    value: fx.Node  # [B, Hk, L, Dv]
    attn_mask: fx.Node | None
    is_causal: bool
    scale: float | None
    enable_gqa: bool
    # nodes the match replaces (besides `output`), deleted by the rewrite once nothing else reads them
    consumed: list[fx.Node] = field(default_factory=list)


@dataclass
class Unrewritable:
    pattern: str
    node: fx.Node
    reason: str


MatchResult = Union[AttentionMatch, Unrewritable, None]
PATTERNS: dict[str, Callable[[fx.Node], MatchResult]] = {}


def register_pattern(name: str):
    def decorate(fn: Callable[[fx.Node], MatchResult]):
        if name in PATTERNS:
            raise ValueError(f"attention pattern {name!r} registered twice")
        PATTERNS[name] = fn
        return fn

    return decorate


def find_attention(graph: fx.Graph) -> list[AttentionMatch | Unrewritable]:
    """Every attention site in graph order, each matched by the first pattern that claims it."""
    found = []
    for node in graph.nodes:
        for match in PATTERNS.values():
            result = match(node)
            if result is not None:
                found.append(result)
                break
    return found


# Importing the pattern modules registers them.
from kvpass.patterns import matmul_softmax, sdpa  # noqa: E402,F401
