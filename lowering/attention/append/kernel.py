"""Quantize-on-append for the int8 cache (per-token scales): device code only.

One program per new token row of one KV head: it reads the row [D] once, takes its largest |x|, writes the
fp32 scale amax * fp32(1 / QMAX) (``lowering.storage.int8.quantize_rows``' rule) and the codes x / scale (an
IEEE division), rounded half to even and clamped to +-QMAX, straight into the cache's sections at row
``start + t``; int8's rotated rows are rotated in registers first. This replaces
the ~12 torch ops per tensor of ``lowering.storage.int8.quantize_rows`` plus the two copies into the
sections: a decode step appends one token per layer, and every op is host time. fp8 (``FP8``): the same
per-token scale with QMAX 448 and e4m3 codes, encoded by integer operations (``e4m3_bits``: Triton's CPU
interpreter converts fp32 to e4m3 wrongly for some values, e.g. -126.06 to -64), so the interpreter tests the
bits the GPU stores.
"""

import triton
import triton.language as tl

from lowering.attention.device.fixed_point import ROUND_MAGIC, e4m3_bits
from lowering.attention.device.reductions import reduce_max
from lowering.attention.device.rotation import rotate_row


@triton.jit
def quantize_rows_append_kernel(
    X, Codes, Scales,  #
    heads, new_rows, start,  #
    stride_xb, stride_xh, stride_xn,  # x [B, Hkv, n, D], last dim contiguous
    stride_cb, stride_ch, stride_cn,  # codes [B, Hkv, >= start + n, D], last dim contiguous (or ROW_BLOCK's)
    stride_sb, stride_sh, stride_sn,  # scales [B, Hkv, >= start + n] fp32
    QMAX: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROTATE_STAGES: tl.constexpr = 0,  # rows stored rotated: x H 2^-shift first (lowering/core/rotation.py); 0: none
    ROTATE_SHIFT: tl.constexpr = 0,
    ROW_BLOCK: tl.constexpr = 0,  # codes in blocks of this many tokens, token-minor (stride_cn: a block's); 0: rows;
    # the last row's program zeroes the rest of its block (``lowering.storage.token_blocks.clear_tail``)
    START_IN_MEMORY: tl.constexpr = False,  # ``start`` points to an int64 on the device (a fixed-capacity cache)
    FP8: tl.constexpr = False,  # float8 e4m3 codes (Codes: their bytes as int8): x / scale clamped to +-QMAX (448)
):
    pid = tl.program_id(0).to(tl.int64)
    t = pid % new_rows
    bh = pid // new_rows
    b = bh // heads
    h = bh % heads
    d = tl.arange(0, BLOCK_D)
    ok = d < HEAD_DIM
    x = tl.load(X + b * stride_xb + h * stride_xh + t * stride_xn + d, mask=ok, other=0.0).to(tl.float32)
    if ROTATE_STAGES:  # the host's butterfly, stage for stage: the same bits as lowering.core.rotation.store_rows
        x = rotate_row(x, BLOCK_D, ROTATE_STAGES, ROTATE_SHIFT)
    scale = reduce_max(tl.abs(x), 0) * (1.0 / QMAX)
    y = tl.math.div_rn(x, tl.where(scale > 0.0, scale, 1.0))  # a plain / is approximate on CUDA
    if FP8:
        code = e4m3_bits(tl.minimum(tl.maximum(y, -QMAX), QMAX)).to(tl.int8)
    else:
        code = tl.minimum(tl.maximum((y + ROUND_MAGIC) - ROUND_MAGIC, -QMAX), QMAX).to(tl.int8)
    if START_IN_MEMORY:
        row = tl.load(start).to(tl.int64) + t
    else:
        row = start + t
    c_base = Codes + b * stride_cb + h * stride_ch
    if ROW_BLOCK:
        c_off = (row // ROW_BLOCK) * stride_cn + row % ROW_BLOCK + d * ROW_BLOCK
        if t == new_rows - 1:
            slot = tl.arange(0, ROW_BLOCK)
            tail = c_base + (row // ROW_BLOCK) * stride_cn + slot[:, None] + d[None, :] * ROW_BLOCK
            past = (slot > row % ROW_BLOCK)[:, None] & ok[None, :]
            tl.store(tail, tl.zeros([ROW_BLOCK, BLOCK_D], dtype=tl.int8), mask=past)
    else:
        c_off = row * stride_cn + d
    tl.store(c_base + c_off, code, mask=ok)
    tl.store(Scales + b * stride_sb + h * stride_sh + row * stride_sn, scale)
