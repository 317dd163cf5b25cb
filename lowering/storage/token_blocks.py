"""Value codes stored in blocks of ``TOKENS`` tokens, token-minor: section [B, Hkv, ceil(L / T), D, T].

Why: in the decode kernel's P @ V product the value tile is the MMA's right operand with the keys as its
reduction dimension, and an MMA operand of 16-bit type holds pairs of consecutive *keys*. Row-major 1-byte
codes ([L, D], channels contiguous) give those pairs only through byte-wise shared-memory reads and byte
permutes. With 16 tokens contiguous per channel the operand is read as ``ldmatrix`` rows. Keys stay
row-major: their reduction dimension is the channels.

A token's row is D bytes at stride T (at slot ``slots[t % T]`` of its block where a format orders its tokens:
int4's values, ``Int4Kivi.VALUE_SLOTS``); the last block of a length that is not a multiple of T is partly
filled: the kernel masks keys past the length, but reads their bytes, so int8 / fp8 writes leave them zero
(``clear_tail``, and the append kernel alike; fixed-capacity buffers start zeroed). Host code moves rows
through ``write_rows`` / ``read_rows``; kernels compute the same offsets
(``lowering/attention/append/kernel.py``, ``lowering/attention/decode/packed_tiles.py``).
"""
from __future__ import annotations

import functools

import torch

from lowering.core.packed import MOVED_AS_BYTES, copy_unless_same

TOKENS = 16  # tokens per block: one 16-byte vector per channel (int8 / fp8 codes)


def blocks(length):
    """Blocks holding ``length`` tokens (an int or a SymInt)."""
    return (length + TOKENS - 1) // TOKENS


def shape(batch, kv_heads, length, dim) -> tuple:
    return (batch, kv_heads, blocks(length), dim, TOKENS)


def _rows_view(section: torch.Tensor) -> torch.Tensor:
    """[B, H, blocks, D, T] -> a [B, H, blocks, T, D] view (token-major indexing, same memory)."""
    return section.transpose(-1, -2)


@functools.cache
def slot_index(slots: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``slots`` as an int64 tensor on ``device``, made once: a step captured in a CUDA graph may not copy a
    host list to the device (the first, eager call of a fixed-capacity cache makes it)."""
    return torch.tensor(slots, device=device)


def write_rows(section: torch.Tensor, start: int, rows: torch.Tensor, slots=None) -> None:
    """Rows [B, H, n, D] into tokens start .. start + n - 1 of ``section`` (token t at slot ``slots[t % T]``)."""
    n = rows.shape[2]
    if n == 0:
        return
    tokens = torch.arange(start, start + n, device=section.device)
    slot = tokens % TOKENS if slots is None else slot_index(tuple(slots), section.device)[tokens % TOKENS]
    rows = rows.to(section.dtype)
    if section.dtype in MOVED_AS_BYTES:
        section, rows = section.view(torch.uint8), rows.view(torch.uint8)
    _rows_view(section)[:, :, tokens // TOKENS, slot] = rows


def clear_tail(section: torch.Tensor, length: int) -> None:
    """Zero the tokens of the last block past ``length`` (a block's slots in token order: int8 / fp8 codes): what
    the decode kernel reads there then is finite (fp8 bytes can be NaN, which a weight of 0 does not cancel)."""
    if length % TOKENS:
        raw = section.view(torch.uint8) if section.dtype in MOVED_AS_BYTES else section
        raw[:, :, length // TOKENS, :, length % TOKENS:] = 0


def read_rows(section: torch.Tensor, length: int, slots=None) -> torch.Tensor:
    """The first ``length`` token rows, [B, H, length, D] (a copy; ``slots`` as ``write_rows``')."""
    B, H, nblk, D, T = section.shape
    raw = section.view(torch.uint8) if section.dtype in MOVED_AS_BYTES else section
    tokens = _rows_view(raw) if slots is None else _rows_view(raw)[:, :, :, slot_index(tuple(slots), raw.device)]
    rows = tokens.reshape(B, H, nblk * T, D)[:, :, :length]
    return rows.view(section.dtype) if raw is not section else rows


def copy_blocks(dst: torch.Tensor, src: torch.Tensor, length: int) -> None:
    """The blocks holding ``length`` tokens of ``src`` into ``dst`` (whole blocks: the bytes past the
    length are never read)."""
    copy_unless_same(dst[:, :, :blocks(length)], src[:, :, :blocks(length)])
