"""Launcher of the int4 fragment kernel (``int4_fragments.py``): when it serves a decode step, and its launch.

``takes`` says whether a launch goes to it: int4 operands that offer it (``KVOperands.fragments``: the scheme
leaves the query's split out exactly where ``lowering.core.operands.int4_fragments_serve`` says this kernel serves,
on every device, so the Triton kernel the CPU runs is its twin), on CUDA, no causal flag, the mask per key or none,
and Gluon importable. ``launch`` compiles it on first use per constants; a compile failure is remembered and the caller
takes the Triton kernel. No host synchronisation: CUDA graphs capture it.
"""
from __future__ import annotations

import logging

import torch

from lowering.attention import grid
from lowering.attention.compile_failure import is_compile_failure, summary
from lowering.attention.device import merge
from lowering.attention.grid import cdiv, next_power_of_2
from lowering.core.operands import KV_INT4, KVOperands

try:  # Gluon (Triton's layout-level dialect) ships with Triton >= 3.5; without it the Triton kernel serves
    from lowering.attention.decode import int4_fragments
except ImportError:  # pragma: no cover - depends on the installed Triton
    int4_fragments = None

logger = logging.getLogger(__name__)

PROGRAMS_PER_SM = 16  # one-warp programs per SM the split rule aims at
MIN_TILES_PER_SPLIT = 4
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


def num_splits(programs_per_split: int, kv_len: int, sm_count: int) -> tuple[int, int]:
    """(splits, keys per split): about ``PROGRAMS_PER_SM`` programs per SM, at least ``MIN_TILES_PER_SPLIT`` tiles
    each, keys per split a multiple of the tile (a split's tiles lie in whole key groups)."""
    tile = int4_fragments.TILE.value
    tiles = max(1, cdiv(kv_len, tile))
    wanted = min(cdiv(PROGRAMS_PER_SM * sm_count, programs_per_split), max(1, tiles // MIN_TILES_PER_SPLIT))
    per_split = cdiv(tiles, wanted)
    return cdiv(tiles, per_split), per_split * tile


def launch(q: torch.Tensor, kv: KVOperands, mask: torch.Tensor | None, mask_kind: int, mask_strides, scale: float,
           out: torch.Tensor) -> torch.Tensor | None:
    """Attention of q [B, Hq, 1, D] over the int4 operands into ``out``; None where the kernel failed to compile
    for these constants (nothing launched: the caller takes the Triton kernel). ``mask``: the launcher's view of
    the model's mask (bool as bytes) with ``mask_strides`` [B, Hq, Lq, L]'s, or None."""
    batch, heads, _, head_dim = q.shape
    num_kv_heads, kv_len = kv.k.shape[1], kv.kv_len
    group = heads // num_kv_heads
    programs = batch * num_kv_heads
    splits, keys_per_split = num_splits(programs, kv_len, grid.sm_count(q.device))
    split_output = splits > 1
    key = (q.device, head_dim, group, mask_kind, split_output)
    if key in _FAILED:
        return None
    part = torch.empty(batch * heads * splits * (head_dim + 1), device=q.device, dtype=torch.float32) \
        if split_output else out
    ks, vs = kv.k.stride(), kv.v.stride()
    mask_arg = q if mask is None else mask
    stride_mb, stride_mn = (0, 0) if mask is None else (mask_strides[0], mask_strides[3])
    try:
        with torch.cuda.device(q.device):
            int4_fragments.int4_decode_kernel[(programs, splits)](
                q, kv.k, kv.v, mask_arg, out, part, *kv.extra,
                q.stride(0), q.stride(1), ks[0], ks[1], vs[0], vs[1], stride_mb, stride_mn,
                num_kv_heads, kv_len, keys_per_split, scale, kv.quant_len, kv.rows_cap or kv.quant_len,
                kv.res_cap or kv.res_len,
                GROUP=group, HEAD_DIM=head_dim, MASK_KIND=mask_kind, SPLIT_OUTPUT=split_output,
                num_warps=1, **int4_fragments.constants(head_dim))
    except Exception as error:  # a compile failure falls back; anything else is a bug to see
        if not is_compile_failure(error):
            raise
        _FAILED[key] = summary(error)
        logger.warning("int4 fragment kernel failed to compile for %s: %s; the Triton kernel serves", key,
                       summary(error))
        return None
    if split_output:
        merge.merge_splits_kernel[(batch * heads,)](
            part, out, splits, HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim),
            SPLIT_BLOCK=min(64, max(16, next_power_of_2(splits))), num_warps=4)
    return out

