"""Merging softmax states: the device functions split-K and early exit share, and stage 2 of the split-KV
kernels (``merge_splits_kernel``, used by the decode and the kept-token attention launchers).

A softmax state is ``(o, lse)``: ``o`` the output normalised by its own weights, ``lse`` the natural-log sum
of exp of the scores. An empty state (no attended key) is ``(0, -inf)``. Follows the state merge of Ye et al.,
FlashInfer (arXiv 2501.01005), section 3.1.
"""

import triton
import triton.language as tl

from lowering.attention.device.reductions import reduce_max, reduce_sum
from lowering.attention.device.rotation import rotate_row


@triton.jit
def merge_states(o_a, lse_a, o_b, lse_b):
    """Merge two softmax states over disjoint key sets.

    ``o_*`` are normalised outputs, ``lse_*`` their log-sum-exp, broadcastable to ``o_*``
    (a scalar for a ``[D]`` row, ``[M, 1]`` for an ``[M, D]`` tile). ``lse = -inf`` marks an
    empty state; two empty states merge to ``(0, -inf)``, never NaN.
    """
    lse_max = tl.maximum(lse_a, lse_b)
    # Both empty: shift by 0, so exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w_a = tl.exp(lse_a - shift)
    w_b = tl.exp(lse_b - shift)
    w = w_a + w_b
    o = (o_a * w_a + o_b * w_b) / tl.where(w == 0.0, 1.0, w)
    lse = tl.where(w == 0.0, float("-inf"), shift + tl.log(w))
    return o, lse


@triton.jit
def reduce_states(o, lse):
    """Merge ``S`` softmax states at once: ``o`` [S, D], ``lse`` [S] -> (``o`` [D], ``lse`` scalar)."""
    lse_max = reduce_max(lse, axis=0)
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp(lse - shift)
    w_sum = reduce_sum(w, axis=0)
    o_out = reduce_sum(o * w[:, None], axis=0) / tl.where(w_sum == 0.0, 1.0, w_sum)
    lse_out = tl.where(w_sum == 0.0, float("-inf"), shift + tl.log(w_sum))
    return o_out, lse_out




@triton.jit
def part_offsets(row, split, num_splits, total_rows, HEAD_DIM: tl.constexpr):
    """Offsets in Part of a row's partial output [D] and LSE: o as [R, S, D], then LSE as [R, S]."""
    o_off = (row * num_splits + split) * HEAD_DIM
    lse_off = total_rows.to(tl.int64) * num_splits * HEAD_DIM + row * num_splits + split
    return o_off, lse_off


@triton.jit
def _load_and_reduce(Part, row, s0, num_splits, total_rows, d, d_ok, HEAD_DIM: tl.constexpr,
                     SPLIT_BLOCK: tl.constexpr):
    s = s0 + tl.arange(0, SPLIT_BLOCK)
    s_ok = s < num_splits
    o_off, lse_off = part_offsets(row, s, num_splits, total_rows, HEAD_DIM)
    lse = tl.load(Part + lse_off, mask=s_ok, other=float("-inf"))
    o = tl.load(Part + o_off[:, None] + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    return reduce_states(o, lse)


@triton.jit(do_not_specialize=["num_splits"])
def merge_splits_kernel(
    Part, Out,  # Part: fp32 partial states (``part_offsets``); Out [B, Hq, Lq, D]; one program per row of Out
    num_splits,  #
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,  # splits merged per step
    ROTATE_STAGES: tl.constexpr = 0,  # rows stored rotated (int8): the merged output turned back
    ROTATE_SHIFT: tl.constexpr = 0,
):
    row = tl.program_id(0).to(tl.int64)  # (b * Hq + h) * Lq + i
    total_rows = tl.num_programs(0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    # The first block of splits seeds the running state (stage 2 only runs with >= 2 splits).
    o, lse = _load_and_reduce(Part, row, 0, num_splits, total_rows, d, d_ok, HEAD_DIM, SPLIT_BLOCK)
    for s0 in range(SPLIT_BLOCK, num_splits, SPLIT_BLOCK):
        o_blk, lse_blk = _load_and_reduce(Part, row, s0, num_splits, total_rows, d, d_ok, HEAD_DIM, SPLIT_BLOCK)
        o, lse = merge_states(o, lse, o_blk, lse_blk)
    if ROTATE_STAGES:
        o = rotate_row(o, BLOCK_D, ROTATE_STAGES, ROTATE_SHIFT)
    tl.store(Out + row * HEAD_DIM + d, o.to(Out.dtype.element_ty), mask=d_ok)
