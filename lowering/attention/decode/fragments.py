"""Launcher of the int4 fragment kernel (``int4_fragments.py``): when it serves a decode step, and its launch.

``takes`` says whether a launch goes to it: int4 operands that offer it (``KVOperands.fragments``: the scheme
leaves the query's split out exactly where ``lowering.core.operands.int4_fragments_serve`` says this kernel serves,
on every device, so the Triton kernel the CPU runs is its twin), on CUDA, no causal flag, the mask per key or none,
and Gluon importable. ``launch`` runs stage 1 (the decode launcher picks the splits, owns the partials and merges
them); it compiles the kernel on first use per constants, and a compile failure is remembered (``failed``) and the
caller takes the Triton kernel. No host synchronisation: CUDA graphs capture it.
"""
from __future__ import annotations

import logging

import torch

from lowering.attention.compile_failure import is_compile_failure, summary
from lowering.core.operands import KV_INT4, KVOperands

try:  # Gluon (Triton's layout-level dialect) ships with Triton >= 3.5; without it the Triton kernel serves
    from lowering.attention.decode import int4_fragments
except ImportError:  # pragma: no cover - depends on the installed Triton
    int4_fragments = None

logger = logging.getLogger(__name__)

_FAILED: dict[tuple, str] = {}  # (device, head_dim, group, mask kind, split output) -> why it failed to compile


def takes(q: torch.Tensor, kv: KVOperands, attn_mask, is_causal: bool, mask_per_key: bool) -> bool:
    """Whether this decode launch goes to the fragment kernel (module docstring)."""
    if int4_fragments is None or not kv.fragments or not q.is_cuda or is_causal:
        return False
    if kv.kv_format != KV_INT4 or kv.split_query or kv.quant_group != int4_fragments.TILE.value:
        return False
    half = q.shape[-1] // 2  # code rows of HALF bytes, value blocks [HALF, 16] bytes, as the kernel indexes them
    if kv.k.stride()[2:] != (half, 1) or kv.v.stride()[2:] != (16 * half, 16, 1):
        return False
    return attn_mask is None or mask_per_key


def _key(q: torch.Tensor, num_kv_heads: int, mask_kind: int, split_output: bool, prefetch: bool,
         max_registers: int | None) -> tuple:
    return (q.device, q.shape[-1], q.shape[1] // num_kv_heads, mask_kind, split_output, prefetch, max_registers)


def failed(q: torch.Tensor, kv: KVOperands, mask_kind: int, num_splits: int, prefetch: bool,
           max_registers: int | None = None) -> bool:
    """Whether the kernel already failed to compile for these constants (the caller goes straight to Triton)."""
    return _key(q, kv.k.shape[1], mask_kind, num_splits > 1, prefetch, max_registers) in _FAILED


def launch(q: torch.Tensor, kv: KVOperands, mask: torch.Tensor | None, mask_kind: int, mask_strides, scale: float,
           out: torch.Tensor, part: torch.Tensor, num_splits: int, keys_per_split: int, prefetch: bool,
           max_registers: int | None = None) -> bool:
    """Stage 1 of the attention of q [B, Hq, 1, D] over the int4 operands: the final rows into ``out`` for one split,
    else the partial states into ``part`` (the decode launcher's buffer and stage 2; its split rule,
    ``launcher.FRAGMENT_CONFIG``). False where the kernel fails to compile for these constants (nothing launched:
    the caller takes the Triton kernel; ``failed`` then says so before a launch). ``mask``: the launcher's view of
    the model's mask (bool as bytes) with ``mask_strides`` [B, Hq, Lq, L]'s, or None. ``prefetch``: the kernel's
    ``PREFETCH`` (the next tile's words loaded before this tile's arithmetic); ``max_registers``: ptxas's cap per
    thread (fewer registers, more resident warps per SM; None: the compiler's choice)."""
    batch, heads, _, head_dim = q.shape
    num_kv_heads = kv.k.shape[1]
    group = heads // num_kv_heads
    split_output = num_splits > 1
    key = _key(q, num_kv_heads, mask_kind, split_output, prefetch, max_registers)
    options = {} if max_registers is None else {"maxnreg": max_registers}
    ks, vs = kv.k.stride(), kv.v.stride()
    stride_mb, stride_mn = (0, 0) if mask is None else (mask_strides[0], mask_strides[3])
    try:
        with torch.cuda.device(q.device):
            int4_fragments.int4_decode_kernel[(batch * num_kv_heads, num_splits)](
                q, kv.k, kv.v, q if mask is None else mask, out, part, *kv.extra,
                q.stride(0), q.stride(1), ks[0], ks[1], vs[0], vs[1], stride_mb, stride_mn,
                num_kv_heads, kv.kv_len, keys_per_split, scale, kv.quant_len, kv.rows_cap or kv.quant_len,
                kv.res_cap or kv.res_len,
                GROUP=group, HEAD_DIM=head_dim, MASK_KIND=mask_kind, SPLIT_OUTPUT=split_output, PREFETCH=prefetch,
                num_warps=1, **options, **int4_fragments.constants(head_dim))
    except Exception as error:  # a compile failure falls back; anything else is a bug to see
        if not is_compile_failure(error):
            raise
        _FAILED[key] = summary(error)
        logger.warning("int4 fragment kernel failed to compile for %s: %s; the Triton kernel serves", key,
                       summary(error))
        return False
    return True
