"""int4 codes: asymmetric 4-bit quantization over a dimension, and KIVI's nibble packing (byte j holds
channels j and j + ceil(D / 2)). Shared by KIVI (``int4.py``) and its per-token form (``int4_rows.py``)."""
from __future__ import annotations

import torch

LEVELS = 15  # 4-bit codes 0..15


def _round_up(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float64, >= 0) rounded up to ``dtype``."""
    r = x64.to(dtype)
    return torch.where(r.double() < x64, torch.nextafter(r, torch.full_like(r, float("inf"))), r)


def quantize_groups(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit quantization of ``x`` over ``dim`` -> (uint8 codes 0..15 like x, scale, minimum),
    scale and minimum in x's dtype with ``dim`` reduced (kept as size 1)."""
    x64 = x.double()
    low = x.amin(dim=dim, keepdim=True)
    scale = _round_up((x64.amax(dim=dim, keepdim=True) - low.double()) / LEVELS, x.dtype)
    s64 = scale.double()
    codes = torch.round((x64 - low.double()) / torch.where(s64 > 0, s64, 1.0)).clamp(0, LEVELS)
    return codes.to(torch.uint8), scale, low


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype) -> torch.Tensor:
    """code * scale + min rounded once to ``dtype``, as the kernel's fma (``int4_tiles.dequantize``): the float64
    sum is exact unless min and code * scale lie 2^25 (fp32 scales; 2^41 for 16-bit ones) or more apart."""
    return (codes.double() * scale.double() + low.double()).to(dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., D] -> [..., ceil(D / 2)] bytes: byte j holds channel j in its low nibble and
    channel j + ceil(D / 2) in its high one (0 past D). The kernel unpacks a tile into its two channel
    halves with a mask and a shift, each a plain [N, D / 2] tile, instead of interleaving 2j and 2j + 1."""
    half = (codes.shape[-1] + 1) // 2
    high = torch.nn.functional.pad(codes[..., half:], (0, 2 * half - codes.shape[-1]))
    return codes[..., :half] | (high << 4)


def unpack_nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cat([packed & 15, packed >> 4], dim=-1)[..., :dim]
