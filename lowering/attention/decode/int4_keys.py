"""int4 (KIVI) key scores by integer MMAs (``SPLIT_QUERY``): device code only.

A key group's per-channel scale folds into the query, s_j = sum_d (q_d scale_d) c_jd + sum_d q_d min_d, and
q o scale is split per row into a fixed point F = 256 hi + lo with int8 hi, lo and a power-of-two step, so the
codes enter int8 MMAs as bytes: c & 15 for the low nibbles, (c & 0xF0) ^ 0x80 = 16 (c - 8) for the high ones
(bitwise ops on four codes at once; the 8 scale_d that centring drops join the minima's term). The fold is
computed on the program's real query rows only (``FOLD_ROWS``, 4 for a decode step at GQA 4), not on the 16 rows
an MMA needs: per 32-key group that is 4 x D products instead of dequantizing 32 x D codes; the hi and lo parts
share one operand (``_stacked_parts``), so the scores take two int8 MMAs. The host twin of the rounding and its
error bound: ``Int4Kivi.kernel_score_error``.
"""

import triton
import triton.language as tl

from lowering.attention.device.fixed_point import ROUND_MAGIC
from lowering.attention.device.reductions import reduce_max, reduce_sum


@triton.jit
def _fold_step(a_lo, a_hi):
    """(step, 1 / step) [R] for the folded halves a [R, BLOCK_H]: the power of two putting the row's largest |a|
    in [2^13, 2^14) steps (top in [2^e, 2^(e+1)): 2^(e - 13), e clamped at -100 for zero or tiny rows), so
    |F| <= 2^14 and hi stays in int8; the inverse is exact, no division."""
    top = reduce_max(tl.maximum(tl.abs(a_lo), tl.abs(a_hi)), axis=1)  # one reduction for both halves
    exp_bits = tl.maximum(top.to(tl.int32, bitcast=True) & 0x7F800000, 27 << 23)
    step = (exp_bits - (13 << 23)).to(tl.float32, bitcast=True)
    return step, ((254 << 23) - exp_bits + (13 << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _fixed_bits(a, inv):
    """a * inv rounded to the integer F inside the fp32 bits of F + 1.5 * 2^23 (|F| < 2^22): its low byte is
    the int8 lo of F = 256 hi + lo, and with 128 added its next byte is hi."""
    return tl.fma(a, inv[:, None], ROUND_MAGIC).to(tl.int32, bitcast=True)


@triton.jit
def _repeat_rows(x, REPEAT: tl.constexpr):
    """[R, C] -> [REPEAT * R, C], row m = row m % R."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    return tl.reshape(tl.broadcast_to(x[None, :, :], [REPEAT, R, C]), [REPEAT * R, C])


@triton.jit
def _stacked_parts(a, inv, REPEAT: tl.constexpr):
    """hi and lo of a [R, C] in one int8 operand [REPEAT * R, C] (REPEAT >= 2): hi in the first half of the rows,
    lo in the second, row p * REPEAT R / 2 + k R + r. An MMA's thread holds rows g and g + 8 of its C fragment,
    so hi . c and lo . c of one query row meet in one thread (four operands, one per part and half, with rows
    repeated: steady path 841 against 791, the A fragments built from duplicated registers)."""
    R: tl.constexpr = a.shape[0]
    C: tl.constexpr = a.shape[1]
    bits = tl.broadcast_to(_fixed_bits(a, inv)[None, :, :], [2, R, C])
    x = tl.where(tl.arange(0, 2)[:, None, None] == 0, (bits + 128) >> 8, bits)
    x = tl.broadcast_to(x[:, None, :, :], [2, REPEAT // 2, R, C])
    return tl.reshape(x, [REPEAT * R, C]).to(tl.int8)


@triton.jit
def _fixed_scores(a_lo, a_hi, inv, c_lo, c_hi, REPEAT: tl.constexpr):
    """16 F . c' per (row, key), int32 [REPEAT * R, BLOCK_N], F the fixed point of a (its halves [R, BLOCK_H]),
    c' = c_lo and 16 (c_hi - 8) (the codes [BLOCK_H, BLOCK_N]): 16 (256 hi + lo) . c_lo + (256 hi + lo) . c'_hi,
    exact: |F| <= 2^14 + 1, so |16 F . c'| <= 16 (2^14 + 1) (15 + 8) D / 2 < 2^31 up to D = 256."""
    s_lo = _stacked_parts(a_lo, inv, REPEAT)
    s_hi = _stacked_parts(a_hi, inv, REPEAT)
    both = tl.dot(s_hi, c_hi, tl.dot(s_lo, c_lo, out_dtype=tl.int32) * 16, out_dtype=tl.int32)
    M: tl.constexpr = both.shape[0]
    N: tl.constexpr = both.shape[1]
    top, low = tl.split(tl.permute(tl.reshape(both, [2, M // 2, N]), (1, 2, 0)))  # rows g, g + M / 2
    return _repeat_rows(top * 256 + low, 2)


@triton.jit
def load_fold_rows(Q, b, kv_head, row_block, q_len, stride_qb, stride_qh, stride_qm, h, GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr, FOLD_ROWS: tl.constexpr, HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The first ``FOLD_ROWS`` query rows of the program's row block (those it has, as the kernel numbers them:
    row r is position r % q_len of head r // q_len), channel halves h and HALF + h in fp32, 0 past them."""
    rows = row_block * BLOCK_M + tl.arange(0, FOLD_ROWS)
    g = rows // q_len
    ptrs = Q + b * stride_qb + (kv_head * GROUP + g) * stride_qh + (rows - g * q_len) * stride_qm
    ok = (rows < GROUP * q_len)[:, None]
    lo = tl.load(ptrs[:, None] + h[None, :], mask=ok & (h < HALF)[None, :], other=0.0)
    hi = tl.load(ptrs[:, None] + HALF + h[None, :], mask=ok & (HALF + h < HEAD_DIM)[None, :], other=0.0)
    return lo.to(tl.float32), hi.to(tl.float32)


@triton.jit
def code_scores(k_base, n, ok, h, stride_n, q_lo, q_hi, scale_lo, scale_hi, low_lo, low_hi,
                HALF: tl.constexpr, REPEAT: tl.constexpr):
    """q . k_j for the keys ``n`` of one group, fp32 [REPEAT * R, BLOCK_N], from the fold rows' halves
    [R, BLOCK_H] (``load_fold_rows``; repeated: the MMA needs 16 rows) and the group's scales and minima. The
    rows fill at most half of the MMA's (``Int4Kivi.splits_query``: a 16-row fold costs more than it saves)."""
    tl.static_assert(REPEAT >= 2, "the fold's rows fill at most half of the MMA's")
    codes = tl.load(k_base + n[:, None] * stride_n + h[None, :], mask=ok[:, None] & (h < HALF)[None, :], other=0)
    c_lo = tl.trans((codes & 15).to(tl.int8))
    # 16 (c - 8) by bitwise ops alone (a byte-wise shift is per-byte extracts and packs): as int8,
    # (16 c) ^ 0x80 = 16 c - 128; the 8 scale_d it drops go into the minimum's term.
    c_hi = tl.trans(((codes & 0xF0) ^ 0x80).to(tl.int8, bitcast=True))
    a_lo = q_lo * scale_lo.to(tl.float32)[None, :]  # exact: a product of two 16-bit floats
    a_hi = q_hi * scale_hi.to(tl.float32)[None, :]
    step, inv = _fold_step(a_lo, a_hi)
    fixed = _fixed_scores(a_lo, a_hi, inv, c_lo, c_hi, REPEAT)
    low_hi = low_hi.to(tl.float32) + 8.0 * scale_hi.to(tl.float32)
    q_min = reduce_sum(q_lo * low_lo.to(tl.float32)[None, :] + q_hi * low_hi[None, :], axis=1)
    return fixed.to(tl.float32) * _repeat_rows((step * (1.0 / 16.0))[:, None], REPEAT) \
        + _repeat_rows(q_min[:, None], REPEAT)
