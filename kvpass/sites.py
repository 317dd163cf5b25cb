"""Site analysis: from a matched attention to its full roles.

Strips GQA expansion (``repeat_kv``'s expand + reshape, or ``repeat_interleave``) so kernels read each
KV head once, and finds the KV-cache update feeding the keys and values (see ``cache_idioms``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from kvpass.cache_idioms import CacheUpdate, find_cache_update
from kvpass.patterns import AttentionMatch
from kvpass.patterns.fx_utils import arg, fake, module_path, op_name


@dataclass
class Site:
    match: AttentionMatch
    module: str  # "model.layers.3.self_attn", or "" when Dynamo recorded none
    key: fx.Node  # keys as kvpass reads them: [B, Hkv, L, D]
    value: fx.Node
    enable_gqa: bool
    repeat_stripped: int  # the GQA factor whose expansion was removed (1: none)
    key_cache: CacheUpdate
    value_cache: CacheUpdate

    @property
    def cache_idiom(self) -> str:
        return self.key_cache.idiom


def strip_repeat_kv(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(x, n_rep) when ``node`` is x with each of its heads repeated n_rep times along dim 1, else None."""
    if op_name(node) == "repeat_interleave":
        repeats, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
        if isinstance(repeats, int) and dim == 1:
            return node.args[0], repeats
        return None
    if op_name(node) not in ("reshape", "view"):
        return None
    expanded = node.args[0]
    if op_name(expanded) != "expand" or op_name(expanded.args[0]) != "getitem":
        return None
    unsqueezed = expanded.args[0]
    index = unsqueezed.args[1]
    if not (isinstance(index, tuple) and len(index) >= 3 and index[2] is None):
        return None
    base = unsqueezed.args[0]
    b, e, out = fake(base), fake(expanded), fake(node)
    if b is None or e is None or out is None or b.dim() != 4 or e.dim() != 5:
        return None
    # [B, Hkv, L, D] -> [B, Hkv, n, L, D] -> [B, Hkv * n, L, D]
    bs, es, os_ = tuple(b.shape), tuple(e.shape), tuple(out.shape)
    if es[:2] != bs[:2] or es[3:] != bs[2:] or os_ != (bs[0], bs[1] * es[2], bs[2], bs[3]):
        return None
    return base, int(es[2])


def analyse(match: AttentionMatch) -> Site:
    key, value, enable_gqa, n_rep = match.key, match.value, match.enable_gqa, 1
    stripped_k, stripped_v = strip_repeat_kv(key), strip_repeat_kv(value)
    if stripped_k and stripped_v and stripped_k[1] == stripped_v[1]:
        (key, n_rep), (value, _) = stripped_k, stripped_v
        enable_gqa = True
    return Site(
        match=match, module=module_path(match.output), key=key, value=value, enable_gqa=enable_gqa,
        repeat_stripped=n_rep, key_cache=find_cache_update(key, match.output),
        value_cache=find_cache_update(value, match.output),
    )
