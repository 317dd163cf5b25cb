"""Rounding to integers in fp32, int8's 16-bit split of the query, fp16 rows scaled by powers of two: device code
only."""

import triton
import triton.language as tl

from lowering.attention.device.reductions import reduce_max

# y + 1.5 * 2^23 - 1.5 * 2^23 rounds fp32 |y| < 2^22 to the nearest integer (ties to even), no libdevice call.
ROUND_MAGIC = tl.constexpr(12582912.0)
# y + 1.5 * 2^52 - 1.5 * 2^52 rounds float64 |y| < 2^51 to the nearest integer (ties to even).
ROUND_MAGIC_F64 = tl.constexpr(6755399441055744.0)
SPLIT_QUERY_MAX = tl.constexpr(32512.0)  # |Q| <= 32512 + 1: hi = (Q + 128) >> 8 stays within int8
F16_TOP_EXPONENT = tl.constexpr(14)  # f16_rows: a row's largest |x| lands in [2^14, 2^15), below fp16's 65504


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


@triton.jit
def e4m3_bits(y):
    """fp32 y (|y| <= 448, not NaN) -> its float8 e4m3fn encoding as int32 0..255, rounded to nearest, ties to
    even, as torch's conversion: by integer operations, because Triton's interpreter converts to e4m3 wrongly (a
    significand that rounds up to the next power of two keeps its exponent: 125.8 -> 64)."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a_bits = bits & 0x7FFFFFFF
    # normal codes: the fp32 significand rounded to 3 bits (ties to even), a carry moving into the exponent,
    # which is then rebiased from 127 to 7
    normal = ((a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    # below 2^-6 (e4m3's smallest normal): multiples of 2^-9 (a * 512 is exact), ties to even; 8 = 2^-6's code
    a = a_bits.to(tl.float32, bitcast=True)
    subnormal = ((a * 512.0 + ROUND_MAGIC) - ROUND_MAGIC).to(tl.int32)
    return tl.where(a < 0.015625, subnormal, normal) | sign


@triton.jit
def pow2(e):
    """2^e as fp32 for int32 e in [-126, 127], exactly (the exponent field alone)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def f16_rows(x):
    """fp32 x [M, N] -> (x 2^e [M, N] in fp16, 2^-e [M] fp32), e per row: the power of two that puts the row's largest
    |x| in [2^14, 2^15), the top of fp16's range (e from the exponent field, clamped to [-126, 126]; rows of zeros
    take 126). A bf16 element converts exactly unless it is below 2^-28 of its row's largest (fp16's subnormals:
    spacing 2^-24, 2^-38 of the largest); an fp32 one rounds once to 11 significant bits."""
    x_max = reduce_max(tl.abs(x), axis=1)
    floor_log2 = ((x_max.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.minimum(tl.maximum(F16_TOP_EXPONENT - floor_log2, -126), 126)
    return (x * pow2(e)[:, None]).to(tl.float16), pow2(-e)
