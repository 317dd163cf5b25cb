"""Launchers of the fused decode scoring kernels (``lowering/attention/scored/kernel.py``).

``score_keys`` reads the candidate keys of a budgeted decode step once and returns the per-KV-head
weights the policy scores with (H2O: summed, ADORE: averaged over query rows) together with the raw
scores; after the policy selects, ``kept_attention`` attends over the kept tokens from those scores and
their values, without reading a key again. Candidates may come in several *segments* (ADORE: old hot
keys, int8 cold keys with per-row scales, this step's keys), laid side by side as columns of one
softmax. Tiles and splits follow the rule of the split-KV decode launcher (``lowering.attention.decode.launcher``):
the scoring pass has the same loop and grid shape as its stage 1.
No host-device synchronisation.
"""
from __future__ import annotations

import contextlib
import math

import torch

from lowering.attention import grid
from lowering.attention.decode.launcher import MAX_BLOCK_M, choose_num_splits, default_config, query_unsupported_reason
from lowering.attention.device import merge
from lowering.attention.grid import cdiv, last_dim_contiguous, next_power_of_2
from lowering.attention.scored import kernel as kernels
from lowering.core.operands import (
    KEYS_FULL,
    KEYS_INT8_ROWS,
    MASK_ADDITIVE,
    MASK_BOOL,
    MASK_NONE,
    KeySegment,
    ScoredKeys,
)

WEIGHT_BLOCK_N = 128  # columns per program of the weights pass: 16 programs per KV head at C = 2049
SPLIT_BLOCK = 16  # LSE splits merged per step of the weights pass (the split rule gives <= ~33 at B=1)


def scoring_unsupported_reason(q, segments, attn_mask, length: int) -> str | None:
    """None when the kernels take this step (q [B, Hq, Lq, D], the segments, HF's mask over ``length``)."""
    if q.device.type not in ("cuda", "cpu"):
        return f"device {q.device.type}"
    for seg in segments:
        k = seg.k
        if k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1] or k.device != q.device:
            return f"keys {tuple(k.shape)} on {k.device} do not match q {tuple(q.shape)} on {q.device}"
        if seg.scale is None and k.dtype != q.dtype:
            return f"keys {k.dtype}, q {q.dtype}"
        if seg.scale is not None and (k.dtype != torch.int8 or seg.scale.dtype != torch.float32):
            return f"scaled keys must be int8 codes with fp32 scales, got {k.dtype} and {seg.scale.dtype}"
    return query_unsupported_reason(q, segments[0].k.shape[1], length, attn_mask)


def _rows_dims(q, num_kv_heads: int):
    batch, num_heads, q_len, head_dim = q.shape
    group = num_heads // num_kv_heads
    block_m = max(16, min(MAX_BLOCK_M, next_power_of_2(group * q_len)))
    return group, block_m, cdiv(group * q_len, block_m), max(16, next_power_of_2(head_dim))


def score_keys(q: torch.Tensor, segments: list[KeySegment], pos: torch.Tensor, attn_mask, scale: float | None,
               length: int, *, mean: bool = False, weights_out=None, scores_out=None, config=None) -> ScoredKeys:
    """Weights each candidate key receives from the query rows of its KV head, in one pass over the keys.

    q [B, Hq, Lq, D] (Lq <= 16); ``segments``: the candidates' keys, in column order, C columns in all;
    ``pos`` [B, Hkv, C] the candidates' logical positions (the mask is read there); ``attn_mask`` None,
    bool (True = attend) or additive (< -1e4: not attended), broadcastable to [B, Hq, Lq, length].
    Returns weights fp32 [B, Hkv, C]: sum over the group's query heads and the query rows of
    softmax over all C candidates (divided by Lq with ``mean``), as ``lowering.formats.budgeted.key_weights``.
    ``weights_out`` / ``scores_out``: contiguous fp32 buffers to fill (tests poison them).
    """
    reason = scoring_unsupported_reason(q, segments, attn_mask, length)
    if reason is not None:
        raise ValueError(f"score_keys: {reason}")
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads = segments[0].k.shape[1]
    cols = sum(seg.k.shape[2] for seg in segments)
    if tuple(pos.shape) != (batch, num_kv_heads, cols):
        raise ValueError(f"score_keys: pos {tuple(pos.shape)} != {(batch, num_kv_heads, cols)}")
    q = last_dim_contiguous(q)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    group, block_m, row_blocks, block_d = _rows_dims(q, num_kv_heads)
    programs = batch * num_kv_heads * row_blocks
    sm_count = grid.sm_count(q.device)
    config = config or default_config(programs, sm_count)
    plans = [choose_num_splits(programs, seg.k.shape[2], sm_count, config) for seg in segments]
    total_splits = sum(n for n, _ in plans)

    mask_kind, mask, mask_strides = MASK_NONE, q, (0, 0, 0, 0)
    if attn_mask is not None:
        mask = attn_mask.expand(batch, num_heads, q_len, length)  # a view: stride 0 on broadcast dims
        mask_strides = mask.stride()
        mask_kind = MASK_BOOL if mask.dtype == torch.bool else MASK_ADDITIVE
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
    pos = last_dim_contiguous(pos)
    scores = _buffer(scores_out, (batch, num_heads, q_len, cols), q.device)
    weights = _buffer(weights_out, (batch, num_kv_heads, cols), q.device)
    lse = torch.empty(batch * num_heads * q_len * total_splits, device=q.device, dtype=torch.float32)
    common = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_D=block_d,
                  MASK_KIND=mask_kind, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  UPCAST_DOT=q.device.type == "cpu" and q.dtype == torch.bfloat16,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    col_offset = split_offset = 0
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        for seg, (num_splits, keys_per_split) in zip(segments, plans):
            k = last_dim_contiguous(seg.k)
            n = k.shape[2]
            scaled = seg.scale is not None
            ks = last_dim_contiguous(seg.scale) if scaled else q
            if n:
                kernels.score_keys_kernel[(programs, num_splits)](
                    q, k, ks, pos, mask, scores, lse,
                    *q.stride()[:3], *k.stride()[:3], *(ks.stride()[:2] if scaled else (0, 0)), *pos.stride()[:2],
                    *mask_strides, num_kv_heads, q_len, n, col_offset, cols, keys_per_split, split_offset,
                    total_splits, scale, KEY_FORMAT=KEYS_INT8_ROWS if scaled else KEYS_FULL,
                    **common)
            else:  # an empty segment still owns its (one) split: an empty state
                lse.view(-1, total_splits)[:, split_offset:split_offset + num_splits] = -math.inf
            col_offset += n
            split_offset += num_splits
        kernels.key_weights_kernel[(batch * num_kv_heads, cdiv(max(cols, 1), WEIGHT_BLOCK_N))](
            scores, lse, weights, q_len, cols, total_splits, 1.0 / q_len if mean else 1.0,
            GROUP=group, BLOCK_M=min(64, next_power_of_2(group * q_len)), BLOCK_N=WEIGHT_BLOCK_N,
            SPLIT_BLOCK=SPLIT_BLOCK, num_warps=4)
    return ScoredKeys(weights, scores, q)


def kept_attention(scored: ScoredKeys, idx: torch.Tensor, v: torch.Tensor, *, out=None, config=None) -> torch.Tensor:
    """Attention of the scored queries over the kept tokens, from the stored scores.

    ``idx`` [B, Hkv, K]: the candidate column of each kept token; ``v`` [B, Hkv, K, D] their values in q's
    dtype, in the same order. Returns [B, Hq, Lq, D] in q's dtype (``out``: a contiguous buffer to fill)."""
    q, scores = scored.q, scored.scores
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, kept = v.shape[1], v.shape[2]
    if tuple(idx.shape) != (batch, num_kv_heads, kept) or v.shape[-1] != head_dim or v.dtype != q.dtype:
        raise ValueError(f"kept_attention: idx {tuple(idx.shape)}, v {tuple(v.shape)} {v.dtype} do not match "
                         f"q {tuple(q.shape)} {q.dtype}")
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(q.shape)} {q.dtype} tensor")
    group, block_m, row_blocks, block_d = _rows_dims(q, num_kv_heads)
    programs = batch * num_kv_heads * row_blocks
    sm_count = grid.sm_count(q.device)
    config = config or default_config(programs, sm_count)
    num_splits, keys_per_split = choose_num_splits(programs, kept, sm_count, config)
    split_output = num_splits > 1
    rows = batch * num_heads * q_len
    part = torch.empty(rows * num_splits * (head_dim + 1), device=q.device, dtype=torch.float32) \
        if split_output else out
    idx, v = last_dim_contiguous(idx), last_dim_contiguous(v)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        kernels.kept_attention_kernel[(programs, num_splits)](
            scores, idx, v, out, part, *idx.stride()[:2], *v.stride()[:3],
            num_kv_heads, q_len, kept, scores.shape[-1], keys_per_split,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_D=block_d,
            SPLIT_OUTPUT=split_output, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST_DOT=q.device.type == "cpu" and q.dtype == torch.bfloat16,
            num_warps=config.num_warps, num_stages=config.num_stages)
        if split_output:
            merge.merge_splits_kernel[(rows,)](
                part, out, num_splits, HEAD_DIM=head_dim, BLOCK_D=block_d,
                SPLIT_BLOCK=min(config.split_block, max(16, next_power_of_2(num_splits))),
                num_warps=config.merge_num_warps)
    return out


def _buffer(out, shape, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=device, dtype=torch.float32)
    if tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous() or out.device != device:
        raise ValueError(f"output buffer must be a contiguous float32 {shape} tensor on {device}")
    return out
