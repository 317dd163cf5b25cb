"""Tile loaders of the packed KV formats (int8 / fp8 codes, aligned high and low parts; KIVI int4's are in
``int4_tiles.py``) for the split-KV decode kernel (``lowering/attention/decode/kernel.py``, whose docstring
describes the formats): device code only.
"""

import triton
import triton.language as tl


@triton.jit
def _unpack_nibbles(codes):
    """uint8 [N, BLOCK_D // 2] -> int32 [N, BLOCK_D]: channel 2j is byte j's low nibble, 2j + 1 its high one
    (aligned's low parts, ``lowering/storage/aligned.py``)."""
    c = codes.to(tl.int32)
    # tl.join + reshape rather than tl.interleave, which is @triton.jit library code (as ``reduce_max`` avoids tl.max).
    both = tl.join(c & 15, c >> 4)  # [N, BLOCK_D // 2, 2]
    return tl.reshape(both, [both.shape[0], 2 * both.shape[1]])


@triton.jit
def load_codes(x_base, n, kv_ok, d, d_ok, stride_n, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """int8 / fp8 codes of a tile [BLOCK_N, BLOCK_D] converted to ``DTYPE`` (exact), 0 on masked lanes.

    Rows are contiguous runs of D bytes (sections are 64-byte aligned, strides multiples of 16 are
    specialised), so each thread loads 16 codes at once. The bytes are loaded through a uint8 view with 0
    on masked lanes (0 is a code of every format; fp8 loads take no ``other=``): zeroing them with a select
    after the conversion instead costs a third of int8's decode time. ``UPCAST`` (``mma``'s: bf16 on the CPU
    interpreter): fp32 instead, equally exact; the interpreter's int8 -> bf16 conversion returns NaN and
    garbage (triton 3.9: -8 -> nan, 3 -> 5.9e-39), and its bf16 dots upcast anyway."""
    mask = kv_ok[:, None] & d_ok[None, :]
    raw = tl.load(x_base.to(tl.pointer_type(tl.uint8)) + n[:, None] * stride_n + d[None, :], mask=mask, other=0)
    c = raw.to(x_base.dtype.element_ty, bitcast=True)
    if UPCAST:
        return c.to(tl.float32)
    return c.to(DTYPE)


@triton.jit
def load_code_blocks(x_base, n0, end, d, d_ok, stride_blk, DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TOKENS: tl.constexpr):
    """Codes of tokens n0 .. n0 + BLOCK_N - 1 from token blocks [blocks, D, TOKENS] (block stride ``stride_blk``;
    ``lowering/storage/token_blocks.py``) as a [BLOCK_N, BLOCK_D] tile in ``DTYPE`` (``load_codes``' rules).

    Loads are masked per whole block (a block holding any token before ``end``), never per token: the tokens
    are the contiguous dimension, and a per-token mask would split the 16-byte vectors. Tokens at or past
    ``end`` in the last block are read as stored and the caller weights them 0: the writes leave them zero
    (``token_blocks.clear_tail``), since fp8 bytes could be NaN and 0 x NaN is NaN; zeroing them here, even in a
    branch only the last tile takes, would keep the tile from going to the MMA straight from shared memory."""
    tl.static_assert(BLOCK_N % TOKENS == 0, "tiles hold whole token blocks")
    blk = n0 // TOKENS + tl.arange(0, BLOCK_N // TOKENS)
    t = tl.arange(0, TOKENS)
    ptrs = x_base.to(tl.pointer_type(tl.uint8)) + blk[:, None, None] * stride_blk + d[None, :, None] * TOKENS \
        + t[None, None, :]
    raw = tl.load(ptrs, mask=(blk * TOKENS < end)[:, None, None] & d_ok[None, :, None], other=0)
    c = tl.reshape(tl.permute(raw.to(x_base.dtype.element_ty, bitcast=True), (0, 2, 1)), [BLOCK_N, BLOCK_D])
    if UPCAST:
        return c.to(tl.float32)
    return c.to(DTYPE)


@triton.jit
def load_aligned(x_base, XS, bh, n, kv_ok, d, d_ok, stride_n, kv_rows):
    """Aligned high parts of a tile as fp32 codes 16 h [BLOCK_N, BLOCK_D] and the per-token steps [BLOCK_N]."""
    code = tl.load(x_base + n[:, None] * stride_n + d[None, :], mask=kv_ok[:, None] & d_ok[None, :], other=0)
    step = tl.load(XS + bh * kv_rows + n, mask=kv_ok, other=0.0)
    return 16.0 * code.to(tl.float32), step


@triton.jit
def load_aligned_low(XL, bh, n, kv_ok, kv_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Aligned low parts l in [-8, 7] of a tile, fp32 [BLOCK_N, BLOCK_D], from [B, Hkv, L, ceil(D / 2)]
    nibbles stored offset by 8."""
    d2 = tl.arange(0, BLOCK_D // 2)
    half = (HEAD_DIM + 1) // 2
    low = tl.load(XL + (bh * kv_rows + n)[:, None] * half + d2[None, :],
                  mask=kv_ok[:, None] & (d2 < half)[None, :], other=8)
    return (_unpack_nibbles(low) - 8).to(tl.float32)
