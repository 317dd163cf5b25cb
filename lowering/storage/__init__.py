"""Storage schemes: how a cache's keys and values are held in a packed buffer (``kv_bits``).

A scheme is registered under its ``kv_bits`` value with :func:`register_scheme` and implements
:class:`StorageScheme`. A scheme knows nothing of graphs, policies or kernels: it lays out, appends and
reads back ``length`` tokens of one layer, and a scheme with a fused decode kernel says what the kernel
reads (``kernel_operands`` -> ``lowering.core.operands.KVOperands``). Formats (``lowering.formats``)
combine a scheme with a token policy and early exit, and hand its operands to the attention launchers.
"""
from __future__ import annotations

from typing import Protocol

import torch

from lowering.core.packed import Layout

State = dict[str, torch.Tensor]


class StorageScheme(Protocol):
    name: str

    def layout(self, batch: int, kv_heads: int, length: int, k_dim: int, v_dim: int, dtype: torch.dtype) -> Layout:
        """Sections holding ``length`` tokens; ``dtype`` is the model's (for any full-precision part)."""

    def append(self, old: State | None, old_length: int, new_k: torch.Tensor, new_v: torch.Tensor,
               out: State) -> None:
        """Write ``old`` (``old_length`` tokens; None when 0) plus ``new_k`` [B, Hkv, n, Dk] and ``new_v``
        [B, Hkv, n, Dv] into ``out``, the sections of ``layout(..., old_length + n, ...)``."""

    def dequantize(self, state: State, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [B, Hkv, length, Dk] and values [B, Hkv, length, Dv] in ``dtype`` (prefill, references)."""


SCHEMES: dict[str, StorageScheme] = {}


def register_scheme(kv_bits):
    """Class decorator: register a scheme (instantiated once) under its ``kv_bits`` option value."""
    def decorate(cls):
        key = str(kv_bits)
        if key in SCHEMES:
            raise ValueError(f"storage scheme {key!r} registered twice")
        SCHEMES[key] = cls()
        return cls

    return decorate


def scheme_for(kv_bits) -> StorageScheme:
    try:
        return SCHEMES[str(kv_bits)]
    except KeyError:
        raise NotImplementedError(f"no storage scheme for kv_bits={kv_bits!r}; have {sorted(SCHEMES)}") from None


from lowering.storage import aligned, fp8, full, int4, int8  # noqa: E402,F401
