"""``F.scaled_dot_product_attention`` in any argument form (positional or keyword, mask bool or
additive, ``is_causal``, ``scale``, ``enable_gqa``)."""
from __future__ import annotations

from torch import fx

from kvpass.patterns import AttentionMatch, Unrewritable, register_pattern
from kvpass.patterns.fx_utils import arg, op_name, rank


@register_pattern("sdpa")
def match_sdpa(node: fx.Node):
    if op_name(node) != "sdpa":
        return None
    query, key, value = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    attn_mask = arg(node, 3, "attn_mask")
    dropout_p = arg(node, 4, "dropout_p", 0.0)
    is_causal = arg(node, 5, "is_causal", False)
    scale = arg(node, 6, "scale")
    enable_gqa = node.kwargs.get("enable_gqa", False)

    def leave(reason: str) -> Unrewritable:
        return Unrewritable("sdpa", node, reason)

    if not isinstance(dropout_p, (int, float)) or dropout_p != 0:
        return leave(f"dropout_p={dropout_p!r}: attention dropout (training) stays with torch")
    if not isinstance(is_causal, bool):
        return leave("is_causal is computed at run time, not a constant")
    if scale is not None and not isinstance(scale, (int, float)):
        return leave("scale is computed at run time, not a constant")
    if not isinstance(enable_gqa, bool):
        return leave("enable_gqa is not a constant")
    if attn_mask is not None and not isinstance(attn_mask, fx.Node):
        return leave(f"attn_mask of type {type(attn_mask).__name__}")
    if any(rank(t) != 4 for t in (query, key, value)):
        return leave("query/key/value are not 4-D [B, H, L, D]")
    if attn_mask is not None and (rank(attn_mask) or 0) > 4:
        return leave("attn_mask has more than 4 dimensions")
    return AttentionMatch(
        pattern="sdpa", output=node, query=query, key=key, value=value, attn_mask=attn_mask,
        is_causal=is_causal, scale=None if scale is None else float(scale), enable_gqa=enable_gqa,
    )
