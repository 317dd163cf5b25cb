"""Packed caches on fixed-capacity buffers: writes at device positions, attention over the whole capacity.

The general packed path (``lowering.formats.cache_step``) grows its buffer on the host's count of tokens;
this one keeps one flat ``uint8`` buffer per layer laid out once for ``capacity`` tokens (a layout of the
storage scheme, ``lowering/storage``), so a decode step is device work of fixed shapes: the write position is
a device tensor, nothing is reallocated, nothing is read back to the host, and CUDA graphs capture it. The
model's mask hides what is not written yet (static-cache semantics: HF's mask spans the capacity).

Ops (``torch.ops.kvpass.*``, registered with their fake implementations in ``lowering/ops.py``):

- ``fixed_cache_write(buffer, positions, new_k, new_v, spec)``: store new_k, new_v [B, Hkv, n, D] at the
  token positions ``positions`` (int64 [n], consecutive, starting at the cache's length); mutates ``buffer``.
- ``fixed_cache_read(buffer, positions, new_k, new_v, spec) -> (k, v)``: the cache as the model's
  full-precision [B, Hkv, capacity, D] keys and values (eager semantics: correct without kvpass compiling,
  and slow: it dequantizes the whole capacity every call).
- ``fixed_cache_attention(q, buffer, positions, new_k, new_v, attn_mask, is_causal, scale, spec)``: what
  the backend puts in place of the read and the attention (``kvpass/variants/fixed_capacity.py``).

Semantics, equal to the general path's (``lowering/formats/dense.py``): a prefill-length write (more than
``MAX_DECODE_QUERY_LEN`` tokens) is attended with its own tokens at full precision and the earlier ones as
stored; a decode-length write is attended as stored (the scheme's decode attention: the fused kernel on
CUDA, dequantize + SDPA elsewhere). One difference: a prefill-length write after earlier tokens (chunked
prefill) reads those earlier tokens as stored once the write completes their int4 group, where the general
path reads them from its old full-precision residual.

Grouped schemes (int4 KIVI: keys per channel over ``scheme.group`` tokens, a full-precision residual for the
open group) on fixed buffers: the code sections cover ``capacity + group`` tokens (the last group is a
scratch target for window groups past the capacity) and the residual section holds ``group - 1`` rows, the
open group's. A write of n tokens at s rebuilds, at full precision, the window of the ``window_groups(n)``
groups from s's group on (the residual rows before s, the new rows, zeros after) and quantizes all of them
(``scheme.append`` on the window, so the codes are the general path's bit for bit), scatters them into the
code sections, and keeps the rows of the group now open as the residual. A group's codes are final once
its last token is written; until then attention reads that group from the residual, so the codes written
for partial groups are never read (the mask the kernel gets hides them).

On CUDA a decode step takes fused launches where the torch path above would take tens of small kernels per layer
(``lowering.formats.launch``): int8 quantizes the new rows straight into the sections at the device position
(``append_at``); int4 writes a decode token in one kernel (``int4_decode_write``: the residual row, the value row,
the key group once it fills; what the torch path stores at every position attention reads) and builds its
decode mask in one (``group_mask``, the twin of ``kernel_mask``).

Budgeted policies (``policy``, ``budget``; ``lowering/formats/fixed_budgeted.py``, ADORE
``lowering/formats/fixed_adore.py``): the buffer is laid out for ``budget`` slots per KV head in the scheme's
per-token form (int4 as ``int4_rows``) plus a position table int64 [B, Hkv, budget] (EMPTY = -1) and the policy's
scores [B, Hkv, budget] (``budget_layout``); ADORE adds its cold int8 store laid out for the capacity, indexed by
position. The selection needs the query, so write, selection and attention are one op,
``fixed_budget_attention``. A one-token step picks the slot to free on the device (the first empty one, else the
argmin of the policy's selection key) and scatters the new token there; the decode kernel reads the ``budget``
slots under the model's mask gathered at their positions, whatever the length. A longer step (prefill) selects
the top ``budget`` with fixed shapes for a given prompt length. ADORE rebuilds any number of cold tokens per step
by rewriting its hot slots (O(budget)) and scores the whole cold store (O(capacity), as its rule reads every
token). Early exit together with a policy is not on fixed buffers (refused: the general path serves it).

Early exit (``lowering/formats/fixed_early_exit.py``): block summaries (per 64-key block key min/max and value
norm) laid out for ``capacity / 64`` blocks; a write recomputes the summaries of the blocks it touches from their
stored rows (fixed shape); blocks past the length are empty under the mask.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import torch

from lowering.attention.early_exit import bound
from lowering.core import packed
from lowering.core.limits import MAX_DECODE_QUERY_LEN, masked_value
from lowering.core.packed import MOVED_AS_BYTES
from lowering.core.reference import exact_attention
from lowering.formats import launch
from lowering.formats.budgeted import per_token
from lowering.storage import State, StorageScheme, scheme_for, token_blocks

CAPACITY_MULTIPLE = 64  # capacities are whole 16-token value blocks and 32-token key groups (int4)
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


@dataclass(frozen=True)
class FixedCacheSpec:
    """One layer's fixed-capacity packed cache: the op's ``spec`` argument (``to_json``)."""

    kv_bits: int | str
    batch: int
    kv_heads: int
    capacity: int  # tokens, a multiple of CAPACITY_MULTIPLE: the length of the model's mask
    k_dim: int
    v_dim: int
    dtype: str  # the model's, "torch.bfloat16"
    early_exit: float | None = None  # tolerance; block summaries after the scheme's sections (fixed_early_exit.py)
    policy: str = "full"  # a budgeted policy: ``budget`` slots per KV head instead (fixed_budgeted.py)
    budget: int | None = None
    asl_layers: tuple[int, int] | None = None  # policy "asl": (first_layer, span), None the paper's
    layer: int = 0  # the layer's index in the model (ASL's cross-layer rule); 0 for every other policy

    def __post_init__(self):
        if self.asl_layers is not None:  # JSON gives a list back
            object.__setattr__(self, "asl_layers", tuple(self.asl_layers))
        if (self.policy == "full") != (self.budget is None) or (self.budget is not None and self.budget < 1):
            raise ValueError(f"policy {self.policy!r} with budget {self.budget!r}: a budget (>= 1) goes with a "
                             "compressing policy, None with 'full'")
        if self.budget is not None and self.early_exit is not None:
            raise ValueError("early_exit with a budgeted policy is not on fixed buffers (use the general path)")
        if self.capacity <= 0 or self.capacity % CAPACITY_MULTIPLE:
            raise ValueError(f"capacity must be a positive multiple of {CAPACITY_MULTIPLE}, got {self.capacity}")
        if self.early_exit is not None and not 0 <= self.early_exit < 1:
            raise ValueError(f"early_exit must be None or a tolerance in [0, 1), got {self.early_exit!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def scheme(self) -> StorageScheme:
        return scheme_for(self.kv_bits)

    @property
    def budgeted(self) -> bool:
        return self.budget is not None

    @property
    def slot_storage(self) -> StorageScheme:
        """The scheme a budgeted cache's slots hold, one row per token: the scheme itself, or its per-token variant
        (int4: ``int4_rows``), as the general path's budgeted formats choose it (``budgeted.per_token``)."""
        scheme = self.scheme
        return scheme if per_token(scheme) else scheme.per_token_variant

    @property
    def group(self) -> int | None:
        """Tokens per key group of a grouped scheme (int4), None for per-token schemes and budgeted caches."""
        return None if self.budgeted else getattr(self.scheme, "group", None)

    @property
    def stored_length(self) -> int:
        """The length the scheme's layout is taken at: the capacity, or for a grouped scheme the capacity plus
        one scratch group in the code sections and ``group - 1`` residual rows."""
        g = self.group
        return self.capacity if g is None else self.capacity + 2 * g - 1

    def layout_at(self, length: int) -> packed.Layout:
        return self.scheme.layout(self.batch, self.kv_heads, length, self.k_dim, self.v_dim, self.torch_dtype)

    @functools.cached_property  # each op call views the buffer by it: computed once per spec
    def layout(self) -> packed.Layout:
        if self.budgeted:
            return budget_layout(self)
        summaries = {} if self.early_exit is None else bound.summary_layout(
            self.batch, self.kv_heads, self.capacity, self.k_dim, self.torch_dtype)
        return {**self.layout_at(self.stored_length), **summaries}

    @functools.cached_property
    def nbytes(self) -> int:
        return packed.layout_nbytes(self.layout)


@functools.cache
def parse_spec(spec: str) -> FixedCacheSpec:
    return FixedCacheSpec(**json.loads(spec))


def allocate(spec: FixedCacheSpec, device: torch.device | str) -> torch.Tensor:
    """The layer's buffer, zeroed: never-written rows and partial groups hold finite numbers, so a kernel
    that multiplies a masked key's value by a zero weight never meets a NaN. A budgeted cache's position
    tables start empty (``clear``)."""
    buffer = torch.zeros(spec.nbytes, dtype=torch.uint8, device=device)
    clear(buffer, spec)
    return buffer


def clear(buffer: torch.Tensor, spec: FixedCacheSpec) -> None:
    """Empty the layer's cache in place: zero bytes, and -1 (empty) in a budgeted cache's position tables."""
    buffer.zero_()
    if spec.budgeted:
        for name, t in packed.views(buffer, spec.layout).items():
            if name in POSITION_TABLES:
                t.fill_(EMPTY)


EMPTY = -1  # a budgeted cache's position table entry for a slot holding no token
POSITION_TABLES = ("pos", "cold_pos")


def budget_layout(spec: FixedCacheSpec) -> packed.Layout:
    """A budgeted cache's sections: ``budget`` slots per (batch row, KV head) in ``slot_storage``'s form, their
    positions ``pos`` int64 [B, Hkv, budget] (EMPTY: no token) and the policy's scores ``score`` fp32
    [B, Hkv, budget]; ADORE adds its cold store laid out for the capacity, indexed by position (one more row, a
    scratch target for writes that do not happen, never a token): int8 keys and values with fp32 row scales,
    ``cold_pos`` int64 (the position where the token is cold, else EMPTY) and ``cold_score`` fp32
    [B, Hkv, capacity + 1]."""
    b, h, n, c = spec.batch, spec.kv_heads, spec.budget, spec.capacity
    layout = dict(spec.slot_storage.layout(b, h, n, spec.k_dim, spec.v_dim, spec.torch_dtype))
    layout.update(pos=((b, h, n), torch.int64), score=((b, h, n), torch.float32))
    if spec.policy == "adore":
        rows = (b, h, c + 1)
        layout.update(cold_k=((*rows, spec.k_dim), torch.int8), cold_k_scale=(rows, torch.float32),
                      cold_v=((*rows, spec.v_dim), torch.int8), cold_v_scale=(rows, torch.float32),
                      cold_pos=(rows, torch.int64), cold_score=(rows, torch.float32))
    return layout


def window_groups(n: int, group: int) -> int:
    """Groups that n consecutive tokens can touch, wherever they start."""
    return (n + group - 2) // group + 1


# ---- section kinds: which sections hold one row per token, which 16-token blocks ---------------------------

@dataclass(frozen=True)
class SectionKinds:
    rows: tuple[str, ...]  # [B, Hkv, L, ...]
    blocks: tuple[str, ...]  # token_blocks: [B, Hkv, ceil(L / 16), D, 16]
    groups: tuple[str, ...]  # [B, Hkv, L / group, D] (grouped schemes' key scales)


@functools.cache
def section_kinds(spec: FixedCacheSpec) -> SectionKinds:
    """Sorted by how dim 2 of each section grows with the length (the layout at two lengths tells)."""
    g = spec.group or 1
    if g % token_blocks.TOKENS and g != 1:
        raise ValueError(f"storage scheme {spec.scheme.name!r}: a key group of {g} tokens is not whole value blocks "
                         f"of {token_blocks.TOKENS}, which fixed-capacity writes copy as such")
    a, b = spec.layout_at(4 * token_blocks.TOKENS * g), spec.layout_at(8 * token_blocks.TOKENS * g)
    rows, blocks, groups = [], [], []
    for name, (shape, _) in a.items():
        ratio = b[name][0][2] / max(1, shape[2])
        if len(shape) == 5 and shape[-1] == token_blocks.TOKENS:
            blocks.append(name)
        elif ratio == 2 and shape[2] == 4 * token_blocks.TOKENS * g:
            rows.append(name)
        elif ratio == 2 and shape[2] == 4 * token_blocks.TOKENS:
            groups.append(name)
        elif not name.endswith("_res"):
            raise ValueError(f"storage scheme {spec.scheme.name!r}: section {name!r} {shape} of unknown kind")
    return SectionKinds(tuple(rows), tuple(blocks), tuple(groups))


def _value_slots(spec: FixedCacheSpec):
    return getattr(spec.scheme, "VALUE_SLOTS", None)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """float8 sections move as bytes (no index_copy kernels for float8 everywhere), exactly."""
    return t.view(torch.uint8) if t.dtype in MOVED_AS_BYTES else t


def _scatter(dst: State, src: State, tokens: torch.Tensor, groups: torch.Tensor | None, spec: FixedCacheSpec,
             n_tokens: int) -> None:
    """Sections ``src`` (the layout of ``n_tokens`` tokens) into ``dst`` at token indices ``tokens`` (int64
    [n_tokens]) and, for a grouped scheme's window of whole groups, group indices ``groups``."""
    kinds = section_kinds(spec)
    for name in kinds.rows:
        _bytes(dst[name]).index_copy_(2, tokens, _bytes(src[name]))
    for name in kinds.groups:
        dst[name].index_copy_(2, groups, src[name])
    slots = _value_slots(spec)
    for name in kinds.blocks:
        if groups is not None:  # whole groups, so whole blocks (a group is a multiple of the block's tokens)
            per_group = spec.group // token_blocks.TOKENS
            block = (groups[:, None] * per_group + torch.arange(per_group, device=groups.device)).flatten()
            _bytes(dst[name]).index_copy_(2, block, _bytes(src[name]))
            continue
        rows = token_blocks.read_rows(src[name], n_tokens, slots)
        slot = tokens % token_blocks.TOKENS
        if slots is not None:
            slot = token_blocks.slot_index(tuple(slots), tokens.device)[slot]
        _bytes(dst[name]).transpose(-1, -2)[:, :, tokens // token_blocks.TOKENS, slot] = _bytes(rows)


def _fresh_sections(spec: FixedCacheSpec, length: int, device) -> State:
    return packed.allocate(spec.layout_at(length), device)[1]


def write(buffer: torch.Tensor, positions: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
          spec: FixedCacheSpec) -> None:
    state = packed.views(buffer, spec.layout)
    n = new_k.shape[2]
    if spec.group is None:
        if launch.append_at(spec.scheme, positions, new_k, new_v, state):
            return  # CUDA, int8: quantized straight into the sections at the device positions, a launch per tensor
        rows = _fresh_sections(spec, n, buffer.device)
        launch.append(spec.scheme, None, 0, new_k, new_v, rows)
        _scatter(state, rows, positions, None, spec, n)
        return
    if n == 1 and launch.int4_decode_write(spec.scheme, positions, new_k, new_v, state):
        return  # CUDA: one launch (int4: the value row, the residual row, the key group once it fills)
    g = spec.group
    window_k, window_v, first = _window(state, positions, new_k, new_v, g)
    span = window_groups(n, g) * g
    groups = _fresh_sections(spec, span, buffer.device)
    launch.append(spec.scheme, None, 0, window_k, window_v, groups)
    group_index = first + torch.arange(span // g, device=buffer.device)
    scratch = spec.capacity // g  # the code sections' last group
    group_index = torch.where(group_index < scratch, group_index, scratch)
    tokens = (group_index[:, None] * g + torch.arange(g, device=buffer.device)).flatten()
    _scatter(state, groups, tokens, group_index, spec, span)
    # the residual: the rows of the group open after the write (none valid when the write ended a group)
    opened = (positions[-1] + 1) // g - first
    rows = (opened * g + torch.arange(g - 1, device=buffer.device)).clamp(max=span - 1)
    state["k_res"].copy_(window_k.index_select(2, rows))
    state["v_res"].copy_(window_v.index_select(2, rows))


def _window(state: State, positions, new_k, new_v, g: int):
    """Full-precision rows of the groups the write touches ([B, Hkv, window_groups(n) * g, D] each) and the
    first group's index (device scalar): residual rows before the write, the new rows, zeros after."""
    n = new_k.shape[2]
    span = window_groups(n, g) * g
    start = positions[0]
    first = start // g
    at = first * g + torch.arange(span, device=positions.device)  # window row -> token position
    rel = at - start
    from_new = ((rel >= 0) & (rel < n))[:, None]
    from_res = (at < start)[:, None]
    new_rows = rel.clamp(0, n - 1)
    res_rows = (at - first * g).clamp(max=g - 2)
    out = []
    for new, res in ((new_k, state["k_res"]), (new_v, state["v_res"])):
        taken = torch.where(from_new, new.index_select(2, new_rows),
                            torch.where(from_res, res.index_select(2, res_rows).to(new.dtype), 0))
        out.append(taken)
    return out[0], out[1], first


def read(buffer: torch.Tensor, positions: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
         spec: FixedCacheSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, Hkv, capacity, D] in the model's dtype, position by position (unwritten
    positions hold finite garbage the mask hides); a prefill-length write's own rows at full precision."""
    state = packed.views(buffer, spec.layout)
    dtype, c, g = spec.torch_dtype, spec.capacity, spec.group
    k, v = spec.scheme.dequantize(state, spec.stored_length, dtype)
    k, v = k[:, :, :c], v[:, :, :c]
    if g is not None:  # the open group's positions from the residual rows
        opened = (positions[-1] + 1) // g
        at = torch.arange(c, device=buffer.device)
        is_open = (at // g == opened)[:, None]
        rows = (at - opened * g).clamp(0, g - 2)
        k = torch.where(is_open, state["k_res"].index_select(2, rows).to(dtype), k)
        v = torch.where(is_open, state["v_res"].index_select(2, rows).to(dtype), v)
    if new_k.shape[2] > MAX_DECODE_QUERY_LEN:
        k, v = k.index_copy(2, positions, new_k.to(dtype)), v.index_copy(2, positions, new_v.to(dtype))
    return _own(k, buffer), _own(v, buffer)


def _own(t: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and not a view of ``buffer`` (an op may not return an alias of its input: 16-bit
    storage dequantizes to views of it)."""
    if t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
        return t.clone(memory_format=torch.contiguous_format)
    return t.contiguous()


def positional_mask(q: torch.Tensor, positions: torch.Tensor, capacity: int) -> torch.Tensor:
    """Bool [1, 1, Lq, capacity]: query i (at position positions[i]) sees positions <= its own."""
    at = torch.arange(capacity, device=q.device)
    return (at[None, :] <= positions[:, None])[None, None]


def kernel_mask(mask: torch.Tensor, positions: torch.Tensor, spec: FixedCacheSpec) -> torch.Tensor:
    """The model's mask over the capacity ([b, h, Lq, capacity]) as a grouped scheme's decode attention
    reads the stored sections: code positions of the open group hidden, the scratch group hidden, then the
    ``group - 1`` residual rows, each under the mask of its position while written (positions < length)."""
    g, c = spec.group, spec.capacity
    length = positions[-1] + 1
    opened = length // g
    at = torch.arange(c, device=mask.device)
    masked = masked_value(mask.dtype)
    codes = torch.where(at // g == opened, masked, mask)
    rows = opened * g + torch.arange(g - 1, device=mask.device)
    residual = torch.where(rows < length, mask.index_select(-1, rows.clamp(max=c - 1)), masked)
    scratch = torch.full((*mask.shape[:-1], g), masked, dtype=mask.dtype, device=mask.device)
    return torch.cat([codes, scratch, residual], -1)


def attention(q, buffer, positions, new_k, new_v, attn_mask, is_causal, scale, spec: FixedCacheSpec):
    """q [B, Hq, Lq, D] over the cache (written already, this step's tokens included) -> [B, Hq, Lq, Dv]."""
    if is_causal or q.shape[2] > MAX_DECODE_QUERY_LEN:
        k, v = read(buffer, positions, new_k, new_v, spec)
        return exact_attention(q, k, v, attn_mask, is_causal, scale, q.shape[1] != spec.kv_heads)
    state, length, mask = decode_operands(q, buffer, positions, attn_mask, spec)
    return launch.decode_attention(spec.scheme, q, state, length, mask, scale).contiguous()


def decode_operands(q, buffer, positions, attn_mask, spec: FixedCacheSpec):
    """(sections, stored length, mask over them) a scheme's ``decode_attention`` takes for a decode-length
    query: the whole capacity under the model's mask (a positional causal one where the model gave none)."""
    if attn_mask is None:
        attn_mask = positional_mask(q, positions, spec.capacity)
    if spec.group is not None:
        built = launch.group_mask(attn_mask, positions, spec.group)  # CUDA: one launch
        attn_mask = kernel_mask(attn_mask, positions, spec) if built is None else built
    return packed.views(buffer, spec.layout), spec.stored_length, attn_mask
