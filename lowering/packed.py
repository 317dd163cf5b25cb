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
"""
from __future__ import annotations

import math

import torch

Section = tuple[tuple[int, ...], torch.dtype]
Layout = dict[str, Section]

ALIGN = 64  # bytes: a cache line, and enough for any vectorised load of a section's first element


def _section_bytes(section: Section) -> int:
    shape, dtype = section
    return math.prod(shape) * dtype.itemsize


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def layout_nbytes(layout: Layout) -> int:
    return sum(_aligned(_section_bytes(s)) for s in layout.values())


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
    """Storage of the values slot: one byte (the keys slot's buffer holds both keys and values)."""
    return torch.zeros(1, dtype=torch.uint8, device=device)


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
    storage = slot.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=slot.device).set_(storage, 0, (storage.nbytes(),))
