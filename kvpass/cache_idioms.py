"""KV-cache idioms: how the keys (or values) that reach attention were written into a cache.

Each idiom is a function ``(node) -> CacheUpdate | None`` registered with :func:`register_cache_idiom`,
given the K (or V) node as attention reads it after GQA expansion is stripped. The roles it records
(past tokens, this step's tokens, the tensor the cache keeps) are what cache-rewriting variants
(quantized, compressed) replace; the exact variant only reports them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import fx

from kvpass.patterns.fx_utils import arg, module_path, normalise_dim, op_name, rank


@dataclass
class CacheUpdate:
    idiom: str  # registered name, or "none"
    past: fx.Node | None = None  # earlier tokens: the cat's first input, or the preallocated buffer
    new: fx.Node | None = None  # this step's keys/values [B, Hkv, Lnew, D]
    written: fx.Node | None = None  # the node whose value the cache keeps after this step
    positions: fx.Node | None = None  # where `new` lands in a preallocated buffer (index_copy_)
    other_readers: list[str] = field(default_factory=list)  # ops besides attention reading the cache


NO_CACHE = CacheUpdate("none")
CACHE_IDIOMS: dict[str, Callable[[fx.Node], CacheUpdate | None]] = {}


def register_cache_idiom(name: str):
    def decorate(fn):
        if name in CACHE_IDIOMS:
            raise ValueError(f"cache idiom {name!r} registered twice")
        CACHE_IDIOMS[name] = fn
        return fn

    return decorate


def find_cache_update(kv: fx.Node, attention: fx.Node) -> CacheUpdate:
    for name, idiom in CACHE_IDIOMS.items():
        found = idiom(kv)
        if found is not None:
            found.other_readers = _other_readers(found.written or kv, kv, attention)
            return found
    return NO_CACHE


def _other_readers(cache: fx.Node, kv: fx.Node, attention: fx.Node) -> list[str]:
    """Users of the cache tensor other than the path to this attention and the cache write itself."""
    allowed = {kv, attention}
    readers = []
    for user in cache.users:
        if user in allowed or user.op == "output" or op_name(user) in ("index_copy_", "index_put_", "setitem", "copy_"):
            continue
        if op_name(user) in ("getitem", "expand", "reshape", "contiguous", "repeat_interleave", "size"):
            continue  # views on the way to attention, or shape reads
        readers.append(f"{op_name(user)} ({module_path(user) or user.name})")
    return readers


def _base_buffer(node: fx.Node) -> fx.Node:
    """The buffer a node views: strips `buf[:, :, :n]` style slicing."""
    while op_name(node) == "getitem" and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


@register_cache_idiom("dynamic_cache_cat")
def dynamic_cache_cat(kv: fx.Node) -> CacheUpdate | None:
    """HF DynamicCache: ``self.keys = torch.cat([self.keys, key_states], dim=-2)``."""
    if op_name(kv) != "cat":
        return None
    tensors, dim = arg(kv, 0, "tensors"), arg(kv, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        return None
    if normalise_dim(dim, rank(kv)) != 2:
        return None
    return CacheUpdate("dynamic_cache_cat", past=tensors[0], new=tensors[1], written=kv)


@register_cache_idiom("static_cache_index_copy")
def static_cache_index_copy(kv: fx.Node) -> CacheUpdate | None:
    """HF StaticCache: ``self.keys.index_copy_(2, cache_position, key_states)`` then attention reads
    the whole preallocated buffer."""
    buffer = kv.args[0] if op_name(kv) == "index_copy_" else _base_buffer(kv)
    for user in buffer.users:
        if op_name(user) == "index_copy_" and normalise_dim(arg(user, 1, "dim"), rank(buffer)) == 2:
            return CacheUpdate("static_cache_index_copy", past=buffer, new=arg(user, 3, "source"),
                               written=buffer, positions=arg(user, 2, "index"))
    return None


@register_cache_idiom("buffer_index_put")
def buffer_index_put(kv: fx.Node) -> CacheUpdate | None:
    """A module's own preallocated buffer (gpt-fast style): ``k_cache[:, :, pos] = k`` or ``index_put_``."""
    buffer = _base_buffer(kv)
    for user in buffer.users:
        if op_name(user) == "setitem":
            return CacheUpdate("buffer_index_put", past=buffer, new=user.args[2], written=buffer)
        if op_name(user) == "index_put_":
            return CacheUpdate("buffer_index_put", past=buffer, new=arg(user, 2, "values"), written=buffer,
                               positions=None)
    return None


# torch.ops.kvpass.fixed_cache_read (fixed_budget_read: a budgeted cache's) as Dynamo records it (the op packet)
# or as built by hand (its overload).
READ_OPS = ("fixed_cache_read", "fixed_cache_read.default", "fixed_budget_read", "fixed_budget_read.default")


@register_cache_idiom("kvpass_packed_cache")
def kvpass_packed_cache(kv: fx.Node) -> CacheUpdate | None:
    """PackedCache (``kvpass/packed_cache.py``): ``keys, values = fixed_cache_read(buffer, positions,
    new_k, new_v, spec)`` after ``fixed_cache_write`` stored the new tokens in the layer's fixed buffer, or a
    budgeted cache's ``fixed_budget_read(buffer, positions, new_k, new_v, spec, asl_store)`` (no write before it)."""
    if op_name(kv) != "getitem" or op_name(kv.args[0]) not in READ_OPS:
        return None
    read = kv.args[0]
    return CacheUpdate("kvpass_packed_cache", past=read.args[0], new=read.args[2 + kv.args[1]], written=kv,
                       positions=read.args[1])
