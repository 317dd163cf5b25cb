"""Hand-written attention, as "eager" implementations spell it:

    matmul(q, k.transpose(-2, -1)) [* scale | / d] [+ mask] -> softmax(-1) [.to(dtype)] [dropout(eval)] -> matmul(., v)

Anchored at the final matmul. The q@k^T product and every node up to the softmax must feed only the
next node: if anything else reads the attention weights (``output_attentions``) the site is left.
"""
from __future__ import annotations

import numbers

from torch import fx

from kvpass.patterns import AttentionMatch, Unrewritable, register_pattern
from kvpass.patterns.fx_utils import arg, normalise_dim, only_user, op_name, rank

# Ops allowed between softmax and the second matmul: dtype casts and eval-mode dropout.
_AFTER_SOFTMAX = ("to", "type", "float", "half", "bfloat16", "dropout", "contiguous")
_SCORE_OPS = ("mul", "div", "matmul", "add")


def _is_number(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def _dropout_is_identity(node: fx.Node) -> bool:
    p = arg(node, 1, "p", 0.5)
    training = arg(node, 2, "training", True)
    return (_is_number(p) and p == 0) or training is False


def _key_from_transpose(node) -> fx.Node | None:
    """k for a node that is k.transpose(-2, -1) (any spelling of the last two dims), else None."""
    if op_name(node) != "transpose":
        return None
    ndim = rank(node)
    dims = {normalise_dim(d, ndim) for d in node.args[1:3]}
    return node.args[0] if ndim is not None and dims == {ndim - 2, ndim - 1} else None


@register_pattern("matmul_softmax")
def match_matmul_softmax(node: fx.Node):
    if op_name(node) != "matmul" or len(node.args) != 2 or rank(node) != 4:
        return None  # kvpass attends over [B, H, L, D]; other products are not its sites
    weights, value = node.args
    chain: list[fx.Node] = []

    cur = weights
    while op_name(cur) in _AFTER_SOFTMAX:
        chain.append(cur)
        cur = cur.args[0]
    if op_name(cur) != "softmax":
        return None  # a matmul that is not the end of attention

    def leave(reason: str) -> Unrewritable:
        return Unrewritable("matmul_softmax", node, reason)

    for n in chain:
        if op_name(n) == "dropout" and not _dropout_is_identity(n):
            return leave("attention dropout in training mode stays with torch")
    softmax = cur
    chain.append(softmax)
    if normalise_dim(arg(softmax, 1, "dim"), rank(softmax)) != (rank(softmax) or 0) - 1:
        return leave("softmax is not over the last dimension")

    mask, scale, scaled, cur = None, 1.0, False, softmax.args[0]
    while op_name(cur) != "matmul":
        name = op_name(cur)
        chain.append(cur)
        if name == "add" and mask is None and not scaled:
            a, b = cur.args[0], cur.args[1]
            cur, mask = (a, b) if op_name(a) in _SCORE_OPS else (b, a)
            if not isinstance(mask, fx.Node) or op_name(cur) not in _SCORE_OPS:
                return leave("score addition is not a mask tensor")
        elif name in ("mul", "div"):
            a, b = cur.args[0], cur.args[1]
            if name == "mul" and _is_number(a):
                a, b = b, a
            if not _is_number(b):
                return leave(f"scores scaled by a tensor ({name})")
            scale = scale * b if name == "mul" else scale / b
            scaled = True
            cur = a
        elif name == "add":
            return leave("mask added before the scale, or two additions: not SDPA's form")
        else:
            return leave(f"unrecognised op {name!r} between q @ k^T and softmax")
    scores = cur
    chain.append(scores)
    query, key_t = scores.args[0], scores.args[1]
    key = _key_from_transpose(key_t)
    if key is None:
        return leave("keys are not transposed with .transpose(-2, -1)")
    if any(only_user(n) is None for n in chain):
        return leave("attention weights are also read elsewhere (output_attentions?)")
    if any(rank(t) != 4 for t in (query, key, value)):
        return leave("query/key/value are not 4-D [B, H, L, D]")
    if only_user(key_t) is not None:
        chain.append(key_t)
    return AttentionMatch(
        pattern="matmul_softmax", output=node, query=query, key=key, value=value, attn_mask=mask,
        is_causal=False, scale=float(scale), enable_gqa=False, consumed=chain,
    )
