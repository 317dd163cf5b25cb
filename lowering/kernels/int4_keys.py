"""int4 (KIVI) key scores by integer MMAs (``SPLIT_QUERY``): device code only.

A key group's per-channel scale folds into the query, s_j = sum_d (q_d scale_d) c_jd + sum_d q_d min_d, and
q o scale is split per row into a fixed point F = 256 hi + lo with int8 hi, lo and a power-of-two step, so the
codes enter int8 MMAs as bytes: c & 15 for the low nibbles, (c & 0xF0) ^ 0x80 = 16 (c - 8) for the high ones
(bitwise ops on four codes at once; the 8 scale_d that centring drops join the minima's term). The fold is
computed on the program's real query rows only (``FOLD_ROWS``, 4 for a decode step at GQA 4) and repeated to
the 16 rows an MMA needs: per 32-key group that is 4 x D products instead of dequantizing 32 x D codes.
sm_90 SASS of the bf16 loop (Triton 3.6, D=128, 32-key tiles, per-key mask): 1121 -> 1058 instructions
(bench/RESULTS.md, session 11). The host twin of the rounding and its error bound: ``Int4Kivi.kernel_score_error``.
"""

import triton
import triton.language as tl

from lowering.kernels.fixed_point import ROUND_MAGIC
from lowering.kernels.reductions import _max, _sum


@triton.jit
def _split(a, inv):
    """a * inv rounded to the integer F = 256 hi + lo, as int8 (hi, lo): the fma's sum with 1.5 * 2^23 holds
    F in its low mantissa bits (|F| < 2^22), whose low byte is lo and, 128 added, whose next byte is hi."""
    bits = tl.fma(a, inv, ROUND_MAGIC).to(tl.int32, bitcast=True)
    return ((bits + 128) >> 8).to(tl.int8), bits.to(tl.int8)


@triton.jit
def fold_query(q_lo, q_hi, scale_lo, scale_hi):
    """The query halves [R, BLOCK_H] (fp32) times a group's scale halves [BLOCK_H], as int8 parts:
    (hi_lo, lo_lo, hi_hi, lo_hi, step [R]) with q o scale ~ step (256 hi + lo) per half. The step is the
    power of two that puts the row's largest |q_d scale_d| in [2^13, 2^14) steps: its inverse is exact, no
    division."""
    a_lo = q_lo * scale_lo.to(tl.float32)[None, :]
    a_hi = q_hi * scale_hi.to(tl.float32)[None, :]
    top = _max(tl.maximum(tl.abs(a_lo), tl.abs(a_hi)), axis=1)  # one reduction for both halves
    # top in [2^e, 2^(e+1)): step 2^(e - 13), so |F| <= 2^14 and hi stays in int8; e clamped at -100 (a zero
    # or tiny row: steps stay normal, every F rounds to 0 or nearly)
    exp_bits = tl.maximum(top.to(tl.int32, bitcast=True) & 0x7F800000, 27 << 23)
    step = (exp_bits - (13 << 23)).to(tl.float32, bitcast=True)
    inv = ((254 << 23) - exp_bits + (13 << 23)).to(tl.float32, bitcast=True)
    h_lo, l_lo = _split(a_lo, inv[:, None])
    h_hi, l_hi = _split(a_hi, inv[:, None])
    return h_lo, l_lo, h_hi, l_hi, step


@triton.jit
def _repeat_rows(x, REPEAT: tl.constexpr):
    """[R, C] -> [REPEAT * R, C], row m = row m % R."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    return tl.reshape(tl.broadcast_to(x[None, :, :], [REPEAT, R, C]), [REPEAT * R, C])


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
    [R, BLOCK_H] (``load_fold_rows``; repeated: the MMA needs 16 rows) and the group's scales and minima."""
    codes = tl.load(k_base + n[:, None] * stride_n + h[None, :], mask=ok[:, None] & (h < HALF)[None, :], other=0)
    c_lo = tl.trans((codes & 15).to(tl.int8))
    # 16 (c - 8) by bitwise ops alone (a byte-wise shift is per-byte extracts and packs): as int8,
    # (16 c) ^ 0x80 = 16 c - 128; the 8 scale_d it drops go into the minimum's term.
    c_hi = tl.trans(((codes & 0xF0) ^ 0x80).to(tl.int8, bitcast=True))
    hl, ll, hh, lh, step = fold_query(q_lo, q_hi, scale_lo, scale_hi)
    hl = _repeat_rows(hl, REPEAT)
    ll = _repeat_rows(ll, REPEAT)
    hh = _repeat_rows(hh, REPEAT)
    lh = _repeat_rows(lh, REPEAT)
    # 16 x the fixed-point scores, 16 (256 hl + ll) . c_lo + (256 hh + lh) . 16 (c_hi - 8), exact in int32:
    # |F| <= 2^14 + 1, so |16 F . c| <= 16 (2^14 + 1) (15 + 8) D / 2 < 2^31 up to D = 256.
    top = tl.dot(hh, c_hi, tl.dot(hl, c_lo, out_dtype=tl.int32) * 16, out_dtype=tl.int32)
    fixed = tl.dot(lh, c_hi, tl.dot(ll, c_lo, top * 16, out_dtype=tl.int32) * 16, out_dtype=tl.int32)
    step = step * (1.0 / 16.0)
    low_hi = low_hi.to(tl.float32) + 8.0 * scale_hi.to(tl.float32)
    q_min = _sum(q_lo * low_lo.to(tl.float32)[None, :] + q_hi * low_hi[None, :], axis=1)
    return fixed.to(tl.float32) * _repeat_rows(step[:, None], REPEAT) + _repeat_rows(q_min[:, None], REPEAT)
