"""Tile loaders of the packed KV formats (int8 / fp8 codes, KIVI int4, aligned high and low parts) for
the split-KV decode kernel (``lowering/kernels/decode_attention.py``, whose docstring describes the
formats): device code only.
"""

import triton
import triton.language as tl

@triton.jit
def _unpack_nibbles(codes):
    """uint8 [N, BLOCK_D // 2] -> int32 [N, BLOCK_D]: channel 2j is byte j's low nibble, 2j + 1 its high one."""
    c = codes.to(tl.int32)
    # tl.join + reshape rather than tl.interleave, which is @triton.jit library code (see _max above).
    both = tl.join(c & 15, c >> 4)  # [N, BLOCK_D // 2, 2]
    return tl.reshape(both, [both.shape[0], 2 * both.shape[1]])


@triton.jit
def _nibbles_f32(c):
    """int32 codes 0..15 -> fp32, exact, as the bit pattern 2^23 + c minus 2^23: two ALU operations instead
    of an int-to-float conversion (1.10x on int4 decode at 8 x 32k, H200, 2026-12-01: bench/RESULTS.md)."""
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _load_codes(x_base, n, kv_ok, d, d_ok, stride_n, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """int8 / fp8 codes of a tile [BLOCK_N, BLOCK_D] converted to ``DTYPE`` (exact), 0 on masked lanes.

    Rows are contiguous runs of D bytes (sections are 64-byte aligned, strides multiples of 16 are
    specialised), so each thread loads 16 codes at once. The bytes are loaded through a uint8 view with 0
    on masked lanes (0 is a code of every format; fp8 loads take no ``other=``): zeroing them with a select
    after the conversion instead took a third of int8's decode time (320 vs 212 us at 8 x 32k, H200,
    2026-12-01: bench/RESULTS.md). ``UPCAST`` (``_mma``'s: bf16 on the CPU interpreter): fp32 instead,
    equally exact; the interpreter's int8 -> bf16 conversion returns NaN and garbage (triton 3.9: -8 -> nan,
    3 -> 5.9e-39), and its bf16 dots upcast anyway."""
    mask = kv_ok[:, None] & d_ok[None, :]
    raw = tl.load(x_base.to(tl.pointer_type(tl.uint8)) + n[:, None] * stride_n + d[None, :], mask=mask, other=0)
    c = raw.to(x_base.dtype.element_ty, bitcast=True)
    if UPCAST:
        return c.to(tl.float32)
    return c.to(DTYPE)


@triton.jit
def _load_code_blocks(x_base, n0, end, d, d_ok, stride_blk, DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TOKENS: tl.constexpr):
    """Codes of tokens n0 .. n0 + BLOCK_N - 1 from token blocks [blocks, D, TOKENS] (block stride ``stride_blk``;
    ``lowering/storage/token_blocks.py``) as a [BLOCK_N, BLOCK_D] tile in ``DTYPE`` (``_load_codes``' rules).

    Loads are masked per whole block (a block holding any token before ``end``), never per token: the tokens
    are the contiguous dimension, and a per-token mask would split the 16-byte vectors. Tokens at or past
    ``end`` in the last block are read as stored (int8 codes are finite whatever the bytes) and the caller
    weights them 0; fp8, whose bytes can be NaN, keeps row-major values (``Fp8.blocked_values``)."""
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
def _load_tile(X, XS, XZ, XR, x_base, bh, n0, n, kv_ok, d, d_ok, stride_n, quant_len, res_len, rows_cap, res_cap,
               DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, KV_FORMAT: tl.constexpr,
               PER_CHANNEL: tl.constexpr, QUANT_GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] K or V tile of keys ``n`` = ``n0`` + 0..BLOCK_N-1 of head row ``bh``
    (= b * Hkv + kv_head) in ``DTYPE`` (KV_FULL and KV_INT4; KV_SCALED_ROWS tiles stay codes: ``_load_codes``).

    ``x_base``: this head's first code (``X`` offset by the head's strides); ``XS``/``XZ``: scale and
    minimum sections; ``XR``: int4's residual window [B, Hkv, res_len, D]. ``PER_CHANNEL`` (int4 keys):
    scales and minima per (group of ``QUANT_GROUP`` tokens, channel) [B, Hkv, quant_len / G, D], else
    per token [B, Hkv, quant_len]. Keys past ``quant_len`` come from the residual window. The sections may
    be prefixes of larger ones (a buffer grown in place): ``rows_cap`` and ``res_cap`` are their rows per
    head (int4 key groups: ``rows_cap / G``)."""
    mask = kv_ok[:, None] & d_ok[None, :]
    if KV_FORMAT == 0:
        x = tl.load(x_base + n[:, None] * stride_n + d[None, :], mask=mask, other=0.0)
    else:
        tl.static_assert(KV_FORMAT == 2, "scaled rows and the aligned format load their tiles in the kernel body")
        in_q = n < quant_len
        q_mask = mask & in_q[:, None]
        d2 = tl.arange(0, BLOCK_D // 2)
        # One uint8 tile, both nibbles unpacked from it with shifts and masks.
        codes = tl.load(x_base + n[:, None] * stride_n + d2[None, :],
                        mask=(kv_ok & in_q)[:, None] & (d2 < (HEAD_DIM + 1) // 2)[None, :], other=0)
        c = _nibbles_f32(_unpack_nibbles(codes))
        if PER_CHANNEL and BLOCK_N > QUANT_GROUP:
            # The tile spans whole key groups (tiles start at multiples of BLOCK_N): one [D] scale and
            # minimum row per group, broadcast over its tokens through a [groups, G, D] view.
            tl.static_assert(BLOCK_N % QUANT_GROUP == 0, "a tile spans whole key groups")
            first = tl.arange(0, BLOCK_N // QUANT_GROUP) * QUANT_GROUP + n0  # each group's first token
            grp = bh * (rows_cap // QUANT_GROUP) + first // QUANT_GROUP
            g_ok = (first < quant_len)[:, None] & d_ok[None, :]
            scale = tl.load(XS + grp[:, None] * HEAD_DIM + d[None, :], mask=g_ok, other=0.0).to(tl.float32)
            low = tl.load(XZ + grp[:, None] * HEAD_DIM + d[None, :], mask=g_ok, other=0.0).to(tl.float32)
            c3 = tl.reshape(c, [BLOCK_N // QUANT_GROUP, QUANT_GROUP, BLOCK_D])
            # Two roundings (product, sum) as the scheme's dequantize: the launch disables FMA contraction.
            x = tl.reshape(c3 * scale[:, None, :] + low[:, None, :], [BLOCK_N, BLOCK_D]).to(DTYPE)
        elif PER_CHANNEL:
            if QUANT_GROUP % BLOCK_N == 0:
                # The tile lies in one key group (tiles start at multiples of BLOCK_N): its scales and
                # minima are one [D] row each, loaded once and broadcast, not a [BLOCK_N, D] gather
                # (which moved 8x the code bytes: 2 x 2-byte scale and minimum per 0.5-byte code).
                grp = bh * (rows_cap // QUANT_GROUP) + n0 // QUANT_GROUP
                g_ok = d_ok & (d * 0 + n0 < quant_len)  # a tensor compare (the interpreter's n0 is an int)
                scale = tl.load(XS + grp * HEAD_DIM + d, mask=g_ok, other=0.0).to(tl.float32)[None, :]
                low = tl.load(XZ + grp * HEAD_DIM + d, mask=g_ok, other=0.0).to(tl.float32)[None, :]
            else:
                off = (bh * (rows_cap // QUANT_GROUP) + n // QUANT_GROUP)[:, None] * HEAD_DIM + d[None, :]
                scale = tl.load(XS + off, mask=q_mask, other=0.0).to(tl.float32)
                low = tl.load(XZ + off, mask=q_mask, other=0.0).to(tl.float32)
            x = (c * scale + low).to(DTYPE)
        else:
            scale = tl.load(XS + bh * rows_cap + n, mask=kv_ok & in_q, other=0.0).to(tl.float32)[:, None]
            low = tl.load(XZ + bh * rows_cap + n, mask=kv_ok & in_q, other=0.0).to(tl.float32)[:, None]
            x = (c * scale + low).to(DTYPE)
        res_ptrs = XR + (bh * res_cap + (n - quant_len))[:, None] * HEAD_DIM + d[None, :]
        if QUANT_GROUP % BLOCK_N == 0:
            # The tile is all codes or all residual window (quant_len is a multiple of the group): a
            # branch, so the (unpipelined) residual load is issued for that one tile only, not as a
            # predicated-off load (a zero-filled [BLOCK_N, D] shared-memory stage) on every tile.
            if n0 >= quant_len:
                x = tl.load(res_ptrs, mask=mask, other=0.0)
        elif BLOCK_N % QUANT_GROUP == 0:
            # Whole groups per tile: only the tile that reaches past the quantized groups reads the window.
            if n0 + BLOCK_N > quant_len:
                x = tl.where(in_q[:, None], x, tl.load(res_ptrs, mask=mask & (n >= quant_len)[:, None], other=0.0))
        else:
            x = tl.where(in_q[:, None], x, tl.load(res_ptrs, mask=mask & (n >= quant_len)[:, None], other=0.0))
    return x


@triton.jit
def _load_int4_values(VS, VZ, VR, v_base, bh, n0, n, kv_ok, d, d_ok, stride_n, quant_len, res_len, rows_cap,
                      res_cap, DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                      QUANT_GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """int4 value tile for the folded product: (x [BLOCK_N, BLOCK_D], scale [BLOCK_N], min [BLOCK_N]) with
    value = x * scale + min: codes 0..15 (exact in ``DTYPE``; fp32 under ``UPCAST``, see ``_load_codes``)
    with the token's scale and minimum for quantized tokens, the stored row with scale 1, min 0 for the
    residual window past ``quant_len``; masked keys give zeros."""
    in_q = n < quant_len
    mask = kv_ok[:, None] & d_ok[None, :]
    d2 = tl.arange(0, BLOCK_D // 2)
    codes = tl.load(v_base + n[:, None] * stride_n + d2[None, :],
                    mask=(kv_ok & in_q)[:, None] & (d2 < (HEAD_DIM + 1) // 2)[None, :], other=0)
    c = _nibbles_f32(_unpack_nibbles(codes))
    if not UPCAST:
        c = c.to(DTYPE)
    res_ptrs = VR + (bh * res_cap + (n - quant_len))[:, None] * HEAD_DIM + d[None, :]
    scale = tl.load(VS + bh * rows_cap + n, mask=kv_ok & in_q, other=0.0).to(tl.float32)
    low = tl.load(VZ + bh * rows_cap + n, mask=kv_ok & in_q, other=0.0).to(tl.float32)
    if QUANT_GROUP % BLOCK_N == 0:  # all codes or all residual: a branch, as in _load_tile
        x = c
        if n0 >= quant_len:
            x = tl.load(res_ptrs, mask=mask, other=0.0).to(c.dtype)
            scale = scale * 0.0 + 1.0
    elif BLOCK_N % QUANT_GROUP == 0:  # whole groups per tile: only the last quantized tile meets the window
        x = c
        if n0 + BLOCK_N > quant_len:
            x = tl.where(in_q[:, None], c, tl.load(res_ptrs, mask=mask & (n >= quant_len)[:, None], other=0.0).to(c.dtype))
            scale = tl.where(in_q, scale, 1.0)
    else:
        x = tl.where(in_q[:, None], c, tl.load(res_ptrs, mask=mask & (n >= quant_len)[:, None], other=0.0).to(c.dtype))
        scale = tl.where(in_q, scale, 1.0)
    return x, scale, low


@triton.jit
def _load_aligned(x_base, XS, bh, n, kv_ok, d, d_ok, stride_n, kv_rows):
    """Aligned high parts of a tile as fp32 codes 16 h [BLOCK_N, BLOCK_D] and the per-token steps [BLOCK_N]."""
    code = tl.load(x_base + n[:, None] * stride_n + d[None, :], mask=kv_ok[:, None] & d_ok[None, :], other=0)
    step = tl.load(XS + bh * kv_rows + n, mask=kv_ok, other=0.0)
    return 16.0 * code.to(tl.float32), step


@triton.jit
def _load_aligned_low(XL, bh, n, kv_ok, kv_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Aligned low parts l in [-8, 7] of a tile, fp32 [BLOCK_N, BLOCK_D], from [B, Hkv, L, ceil(D / 2)]
    nibbles stored offset by 8."""
    d2 = tl.arange(0, BLOCK_D // 2)
    half = (HEAD_DIM + 1) // 2
    low = tl.load(XL + (bh * kv_rows + n)[:, None] * half + d2[None, :],
                  mask=kv_ok[:, None] & (d2 < half)[None, :], other=8)
    return (_unpack_nibbles(low) - 8).to(tl.float32)
