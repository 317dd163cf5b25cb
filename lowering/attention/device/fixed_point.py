"""Rounding to integers in fp32 and int8's 16-bit split of the query: device code only."""

import triton
import triton.language as tl

from lowering.attention.device.reductions import reduce_max

# y + 1.5 * 2^23 - 1.5 * 2^23 rounds fp32 |y| < 2^22 to the nearest integer (ties to even), no libdevice call.
ROUND_MAGIC = tl.constexpr(12582912.0)
SPLIT_QUERY_MAX = tl.constexpr(32512.0)  # |Q| <= 32512 + 1: hi = (Q + 128) >> 8 stays within int8


@triton.jit
def split_query(q):
    """The query [M, D] as a 16-bit fixed point per row, q ~ step * (256 hi + lo), hi and lo int8:
    (hi, lo, step [M]). Rows of zeros take step 1 (all codes 0). Error bound: ``Int8.kernel_query_error``."""
    q_f = q.to(tl.float32)
    q_max = reduce_max(tl.abs(q_f), axis=1)
    step = tl.where(q_max > 0.0, q_max * (1.0 / SPLIT_QUERY_MAX), 1.0)
    fixed = ((q_f / step[:, None] + ROUND_MAGIC) - ROUND_MAGIC).to(tl.int32)
    hi = (fixed + 128) >> 8
    return hi.to(tl.int8), (fixed - hi * 256).to(tl.int8), step
