"""A layer's KV cache in a packed form, held inside the model's own cache tensors.

The model's code keeps treating its cache as ``[B, Hkv, L, D]`` tensors: HF's DynamicCache does
``self.keys = torch.cat([self.keys, new], dim=-2)`` and reads its length from ``keys.shape[-2]``. A
variant that stores the cache differently (quantized, compressed, with block summaries) writes back,
in place of those tensors, a *slot*: a ``uint8`` tensor of the shape the model expects whose strides
are all 0, so it costs no memory of its own, and whose storage is one flat byte buffer holding the
layer's real state. The model's ``cat`` still traces (it promotes to the model's dtype, and the
backend rewrites it away), ``get_seq_length`` still reads L, and the bytes the cache holds are the
buffer's: the memory is really saved and really measurable (``untyped_storage().nbytes()``).

The buffer is a sequence of typed sections (a *layout*: name -> (shape, dtype)), each aligned to
``ALIGN`` bytes, so kernels get ordinary typed tensors. The layout is a pure function of what the host
knows (batch, heads, head dim, L, dtype), so no device value is ever read to find a section.

Keys hold the buffer; the values slot is a stride-0 view of a 1-byte buffer (nothing to store, but it
must be a fresh tensor each step: ops may not return their inputs).

Growth in place. A format whose sections only grow at the end (``grows_in_place``) gets a buffer laid
out for a *capacity* of tokens (``capacity``: a geometric grid, less than 1/32 above the length past 2k tokens), and the
sections of ``length`` tokens are prefix views of the capacity's (``trimmed``). Appending a token then
writes it into the same buffer; a new buffer (and one copy of the cache) is needed only when the length
crosses a grid point, so a decode step moves the bytes of its new token, not of the whole cache. Ops may
not return (an alias of) their inputs, so the op hands the grown buffer back as a fresh tensor over the
same memory (``alias``: a DLPack import, which keeps the allocation alive). A buffer is grown in place
only by the slot that last wrote it (``heads``): a slot reused after its buffer grew on (two
continuations of one prompt) appends into a fresh copy instead, so no slot ever sees another's tokens.
"""
from __future__ import annotations

import math
import weakref

import torch

Section = tuple[tuple[int, ...], torch.dtype]
Layout = dict[str, Section]

ALIGN = 64  # bytes: a cache line, and enough for any vectorised load of a section's first element
# float8 has no gather / scatter / where / index_put kernels everywhere (torch 2.13 CPU): rows of these dtypes
# are moved as their bytes, which is exact.
MOVED_AS_BYTES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _section_bytes(section: Section) -> int:
    shape, dtype = section
    return math.prod(shape) * dtype.itemsize


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def layout_nbytes(layout: Layout) -> int:
    return sum(_aligned(_section_bytes(s)) for s in layout.values())


def section_nbytes(layout: Layout) -> dict[str, int]:
    """Bytes each section of ``layout`` takes in a buffer (aligned as ``layout_nbytes`` counts them)."""
    return {name: _aligned(_section_bytes(s)) for name, s in layout.items()}


def views(buffer: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Typed views of the sections of a flat ``uint8`` buffer laid out by ``layout``."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError(f"packed buffer must be a flat uint8 tensor, got {buffer.dtype} {tuple(buffer.shape)}")
    need = layout_nbytes(layout)
    if buffer.numel() != need:
        raise ValueError(f"packed buffer holds {buffer.numel()} bytes; this layout needs {need}: "
                         f"the cache was written by a different kvpass configuration or was modified")
    out, offset = {}, 0
    for name, (shape, dtype) in layout.items():
        nbytes = _section_bytes((shape, dtype))
        out[name] = buffer[offset:offset + nbytes].view(dtype).view(shape)
        offset += _aligned(nbytes)
    return out


def allocate(layout: Layout, device: torch.device | str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A fresh (uninitialised) buffer for ``layout`` and its section views."""
    buffer = torch.empty(layout_nbytes(layout), dtype=torch.uint8, device=device)
    return buffer, views(buffer, layout)


def slot_view(buffer: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The tensor the model's cache holds: ``shape`` ([B, Hkv, L, D]), all strides 0, storage ``buffer``.

    Traceable with symbolic sizes; inside a compiled graph AOTAutograd regenerates it as a view of
    the buffer, so the buffer is not copied."""
    return buffer[:1].view((1,) * len(shape)).expand(shape)


def marker_buffer(device: torch.device | str) -> torch.Tensor:
    """Storage of the values slot: one byte, never read (the keys slot's buffer holds keys and values;
    ``empty``, not ``zeros``: no fill kernel on the decode path)."""
    return torch.empty(1, dtype=torch.uint8, device=device)


def is_slot(t: torch.Tensor) -> bool:
    # Size-1 dims keep stride 1 (a batch of one), so only the strides of longer dims say "no memory".
    return (t.dtype == torch.uint8 and t.dim() == 4 and t.numel() > 0
            and all(st == 0 for st, n in zip(t.stride(), t.shape) if n != 1))


def slot_buffer(slot: torch.Tensor) -> torch.Tensor:
    """The flat byte buffer behind a slot (raises if ``slot`` is not one: e.g. a copy made by beam
    search's cache reordering, which materialises the view and loses the buffer)."""
    if not is_slot(slot):
        raise ValueError(
            f"kvpass: this layer's cache tensor ({slot.dtype}, shape {tuple(slot.shape)}, strides {slot.stride()}) "
            "is not a kvpass packed slot; it was copied or rebuilt outside kvpass (e.g. beam search's cache "
            "reordering), so the packed cache behind it is gone")
    return whole_buffer(slot)


def whole_buffer(t: torch.Tensor) -> torch.Tensor:
    """The flat byte tensor over all of ``t``'s storage (the op returns a 1-byte view of its buffer)."""
    storage = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage, 0, (storage.nbytes(),))


# Capacity grid: multiples of a step that doubles with every octave of the length (32 steps per octave), so
# the slack is < 1/32 of the length (or one 64-token step below 2048) and a cache is copied about 32 times
# per doubling: at 32k tokens, one copy of the cache per 1024 steps. Grid points are
# multiples of 64, hence of every group size a scheme uses (int4's 32), so ``capacity_layout`` can size
# residual sections from ``length = capacity - 1``.
MIN_CAPACITY_STEP = 64


def capacity(length: int) -> int:
    """The smallest grid point >= ``length`` (concrete ints: called on real lengths only). For L0 < L1 <=
    capacity(L0), capacity(L1) == capacity(L0): the buffer of L0 serves every length up to its capacity."""
    step = max(MIN_CAPACITY_STEP, 1 << max(0, int(length).bit_length() - 6))
    return max(step, -(-int(length) // step) * step)


def capacity_layout(layout_of, cap: int) -> Layout:
    """The buffer layout for up to ``cap`` tokens: each section as large as in ``layout_of(cap)`` and
    ``layout_of(cap - 1)`` (the latter holds the largest residual of schemes that keep ``length % G``
    tokens apart), so every length <= cap has its sections as prefixes (``trimmed``)."""
    full, below = layout_of(cap), layout_of(cap - 1)
    if full.keys() != below.keys():
        raise ValueError(f"layout sections change with the length: {sorted(full)} vs {sorted(below)}")
    out = {}
    for name, (shape, dtype) in full.items():
        other_shape, other_dtype = below[name]
        if other_dtype != dtype or len(other_shape) != len(shape):
            raise ValueError(f"section {name!r} changes dtype or rank with the length")
        out[name] = (tuple(max(a, b) for a, b in zip(shape, other_shape)), dtype)
    return out


def trimmed(sections: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Prefix views of capacity ``sections`` with the shapes of ``layout`` (the sections of a length)."""
    out = {}
    for name, (shape, _) in layout.items():
        t = sections[name]
        for dim, (n, m) in enumerate(zip(shape, t.shape)):
            if n != m:  # narrow: a few microseconds of host time, indexing with slices several times that
                if n > m:
                    raise ValueError(f"section {name!r}: {tuple(shape)} does not fit the capacity {tuple(t.shape)}")
                t = t.narrow(dim, 0, n)
        out[name] = t
    return out


# Buffer address -> (weak reference to the tensor that allocated it, length last written into it).
heads: dict[int, tuple[weakref.ref, int]] = {}


def commit(root: torch.Tensor, length: int) -> None:
    """Record that ``root``'s buffer now holds ``length`` tokens, written by the newest slot."""
    heads[root.data_ptr()] = (weakref.ref(root), length)


# Buffers whose kept rows a decode step rewrote in place (``lowering/formats/slot_replacement.py``): address ->
# weak reference to the allocating tensor. A slot older than such a buffer's last writer no longer reads
# the tokens it held (``check_current``).
rewritten: dict[int, weakref.ref] = {}


def mark_rewritten(root: torch.Tensor) -> None:
    rewritten[root.data_ptr()] = weakref.ref(root)


def check_current(slot: torch.Tensor, length: int) -> None:
    """Raise if ``slot`` (holding ``length`` tokens) is not its buffer's last writer and the buffer's rows
    were rewritten in place since: reading it would silently give another step's tokens."""
    ptr = slot.untyped_storage().data_ptr()
    ref, entry = rewritten.get(ptr), heads.get(ptr)
    if ref is None or ref() is None or entry is None or entry[1] == length:
        return
    raise RuntimeError(
        f"kvpass: this cache slot holds {length} tokens, but a later decode step ({entry[1]} tokens) rewrote "
        "its buffer in place (a budgeted policy replaces evicted tokens in their slots). Reusing an earlier "
        "cache state is not supported with policies; keep a copy of the cache (copy.deepcopy before the step) "
        "or compile with the option replace_in_place=False.")


def growable_root(slot: torch.Tensor, length: int) -> torch.Tensor | None:
    """The allocation behind ``slot`` if ``slot`` is the last writer of its buffer (it holds ``length``
    tokens and nothing appended since), else None (the caller copies into a fresh buffer)."""
    storage = slot.untyped_storage()
    entry = heads.get(storage.data_ptr())
    if entry is None or entry[1] != length:
        return None
    root = entry[0]()
    if root is None or root.untyped_storage().nbytes() != storage.nbytes():
        return None
    return root


def copy_unless_same(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, skipped when both are the same memory (old tokens of a buffer grown in place)."""
    if dst.data_ptr() != src.data_ptr() or dst.stride() != src.stride() or dst.shape != src.shape:
        dst.copy_(src)


def alias(root: torch.Tensor) -> torch.Tensor:
    """A fresh tensor object over ``root``'s memory, with storage of its own that keeps ``root`` alive.

    stream=-1 (no synchronisation): producer and consumer are this same stream, while ``torch.from_dlpack`` on
    a CUDA tensor looks the current stream up and, where it is not the legacy default, records and waits on an
    event, per layer and decode step."""
    return torch._C._from_dlpack(root.__dlpack__(stream=-1))
