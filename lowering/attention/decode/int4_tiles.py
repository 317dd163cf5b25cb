"""KIVI int4 tiles for the split-KV decode kernel (``lowering/attention/decode/kernel.py``): device code only.

Byte j of a packed row holds channel j (low nibble) and channel j + HALF (high nibble), HALF = ceil(D / 2)
(``lowering/storage/int4.py``: ``pack_nibbles``). A tile is therefore two plain [BLOCK_N, BLOCK_H] code tiles,
``c & 15`` and ``c >> 4``, BLOCK_H = BLOCK_D / 2: the query is loaded as its two channel halves, scores are
q_lo . k_lo + q_hi . k_hi (two MMAs), the output is accumulated as two halves and written as two, and no
tile is ever interleaved (the 2j / 2j + 1 layout's join + reshape cost register shuffles and byte-wise
shared-memory reads). Value bytes lie in 16-token blocks whose int32 words hold the key pairs the P @ V
operand takes (``Int4Kivi.VALUE_SLOTS``), so a pair of codes is one mask of a word (``_value_tile``).

Key tiles lie in one key group (the launcher caps BLOCK_N at it), so their scales and minima are one [D] row
each. With ``INT_KEYS`` (the kernel's SPLIT_QUERY) the scales fold into the query's real rows and the codes go to
int8 MMAs unconverted (``int4_keys.py``); otherwise (fp32, D <= 32, > 8 query rows) keys are dequantized in
registers by one fma in the dtype (``dequantize``), codes built as bit patterns (``_codes_16bit``). The fold
covers the real query rows only: folding into all 16 padded rows puts as many elements per thread as the key
tile itself.
"""

import triton
import triton.language as tl

from lowering.attention.decode import int4_keys
from lowering.attention.device.reductions import mma, mma_acc, reduce_max, reduce_sum


@triton.jit
def _codes_f32(c):
    """uint8 codes 0..15 -> fp32, exact: the bit pattern 2^23 + c minus 2^23, two ALU operations instead of an
    int-to-float conversion."""
    return (c.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _codes_16bit(c16, zero, DTYPE: tl.constexpr):
    """int16 codes 0..15 -> bf16 / fp16, exact: the bit pattern of 128 + c (bf16) or 1024 + c (fp16) minus that
    offset, so the subtraction is one packed HADD2 per two codes (fewer instructions than through fp32).
    ``zero``: 0 at run time that the compiler cannot prove 0 (``opaque_zero``): with the pattern in a register,
    ptxas merges c & 15 and | pattern into one LOP3 (two immediates need two)."""
    if DTYPE == tl.bfloat16:
        x = (c16 | (zero | 0x4300)).to(tl.bfloat16, bitcast=True) - 128.0
    else:
        x = (c16 | (zero | 0x6400)).to(tl.float16, bitcast=True) - 1024.0
    return x


@triton.jit
def _load_codes(x_base, n, ok, h, stride_n, zero, HALF: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Codes of channels h and HALF + h of tokens ``n``: two [BLOCK_N, BLOCK_H] tiles from one byte tile, 0 on
    lanes off ``ok`` and past the channels, in ``DTYPE`` (exact; fp32 under ``UPCAST``, see ``_mma``: the
    interpreter's bf16 arithmetic works on the bit patterns). Converted before any use: the compiler's layout
    conversions then move 16-bit, not 32-bit, tiles."""
    codes = tl.load(x_base + n[:, None] * stride_n + h[None, :], mask=ok[:, None] & (h < HALF)[None, :], other=0)
    if UPCAST or DTYPE == tl.float32:
        lo = _codes_f32(codes & 15)
        hi = _codes_f32(codes >> 4)
    else:
        # Widened to 16 bits before the nibbles are taken: byte-wise masks and shifts cost more permutes and
        # masks per tile.
        c16 = codes.to(tl.int16)
        z16 = zero.to(tl.int16)
        lo = _codes_16bit(c16 & 15, z16, DTYPE)
        hi = _codes_16bit(c16 >> 4, z16, DTYPE)
    return lo, hi


@triton.jit
def _value_tile(words, shift, pattern, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """One channel half of a value tile, [16 * blocks, BLOCK_H], from words [blocks, 4, BLOCK_H]: word q's nibbles at
    ``shift`` and ``shift + 16`` are keys 2q, 2q + 1 of its block, at ``shift + 8`` and ``shift + 24`` keys 2q + 8,
    2q + 9 (``Int4Kivi.VALUE_SLOTS``). Each pair is ``(w >> s) & 0x000F000F | pattern``, one LOP3 (and a shift)
    with ``pattern`` a register (``_codes_16bit``), whose 16-bit halves are the pair's bf16 / fp16 patterns: one
    HADD2 subtracts the offset of both (ptxas keeps the halves in their word). The pairs are spread by broadcasts,
    not ``tl.join``: Triton then reads the words from shared memory straight into the MMA operand's layout (joined,
    the converted tile takes a second trip through shared memory)."""
    two = tl.arange(0, 2)
    pairs = ((words[:, :, :, None] >> (shift + 8 * two)[None, None, None, :]) & 0x000F000F) | pattern
    x = pairs[:, :, :, :, None] >> (16 * two)[None, None, None, None, :]  # [block, q, channel, key // 8, key % 2]
    if UPCAST or DTYPE == tl.float32:
        codes = _codes_f32(x & 0xFFFF)
    elif DTYPE == tl.bfloat16:
        codes = x.to(tl.int16).to(DTYPE, bitcast=True) - 128.0
    else:
        codes = x.to(tl.int16).to(DTYPE, bitcast=True) - 1024.0
    codes = tl.permute(codes, (0, 3, 1, 4, 2))  # [block, key // 8, q, key % 2, channel]
    return tl.reshape(codes, [words.shape[0] * 16, words.shape[2]])


@triton.jit
def _load_value_blocks(v_base, n0, quant_len, h, stride_blk, zero, HALF: tl.constexpr, DTYPE: tl.constexpr,
                       UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Value codes of keys n0 .. n0 + BLOCK_N - 1, channels h and HALF + h, from 16-token blocks [blocks, HALF, 16]
    (block stride ``stride_blk`` bytes), loaded as int32 words: 0 past ``quant_len`` (whole blocks: it is a
    multiple of the key group), as stored for keys masked inside a block (finite codes, weighted 0)."""
    blk = tl.arange(0, BLOCK_N // 16)
    q = tl.arange(0, 4)
    # Offsets from the tile's first block, the same every tile (hoisted): 717 against 720 steady at bf16 D=128.
    first = (v_base + n0 // 16 * stride_blk).to(tl.pointer_type(tl.int32))
    ptrs = first + blk[:, None, None] * (stride_blk // 4) + h[None, None, :] * 4 + q[None, :, None]
    in_codes = blk * 0 + n0 < quant_len  # a tensor compare (the interpreter's n0 is an int)
    words = tl.load(ptrs, mask=in_codes[:, None, None] & (h < HALF)[None, None, :], other=0)
    if UPCAST or DTYPE == tl.float32:
        pattern = zero
    elif DTYPE == tl.bfloat16:
        pattern = zero | 0x43004300
    else:
        pattern = zero | 0x64006400
    return _value_tile(words, 0, pattern, DTYPE, UPCAST), _value_tile(words, 4, pattern, DTYPE, UPCAST)


@triton.jit
def opaque_zero(quant_len):
    """0 (quant_len >= 0) as a value the compiler does not know (``_codes_16bit``)."""
    return quant_len >> 31


@triton.jit
def dequantize(c, scale, low, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """c * scale + min rounded once to ``DTYPE`` (one fma: the scheme's ``dequantize_groups``), from codes of
    ``_load_codes`` and scales and minima in ``DTYPE``; under ``UPCAST`` an fp32 fma (c * scale is exact in fp32)
    rounded to bf16 as the interpreter rounds (truncating)."""
    if UPCAST:
        x = tl.fma(c, scale.to(tl.float32), low.to(tl.float32)).to(DTYPE)
    else:
        x = tl.fma(c, scale.to(DTYPE), low.to(DTYPE))
    return x


@triton.jit
def load_halves(row_ptrs, ok, h, HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Channels h and HALF + h of full-precision rows at ``row_ptrs`` (the residual window, the query): two
    tiles, 0 on lanes off ``ok`` and past ``HEAD_DIM``. A [BLOCK_H] vector's halves for a scalar ``row_ptrs``."""
    lo = tl.load(row_ptrs + h, mask=ok & (h < HALF), other=0.0)
    hi = tl.load(row_ptrs + HALF + h, mask=ok & (HALF + h < HEAD_DIM), other=0.0)
    return lo, hi


@triton.jit
def _load_row_halves(row_ptr, ok, h, HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Channels h and HALF + h of one row (a group's scales or minima) from a single [2, BLOCK_H] load, 0 off
    ``ok`` [BLOCK_H] and past ``HEAD_DIM``. One load of the whole row gives each thread 4 contiguous bytes (bf16,
    D=128, 2 warps), which the pipeliner issues ahead as cp.async; the [BLOCK_H] halves (2 bytes a thread) were
    plain loads waited on in their own iteration, each then broadcast through shared memory (two barriers)."""
    ch = tl.arange(0, 2)[:, None] * HALF + h[None, :]
    row = tl.load(row_ptr + ch, mask=ok[None, :] & (h < HALF)[None, :] & (ch < HEAD_DIM), other=0.0)
    return tl.split(tl.permute(row, (1, 0)))


@triton.jit
def key_scores(q_lo, q_hi, fold_lo, fold_hi, KS, KZ, KR, k_base, bh, n0, n, kv_ok, h, stride_n, quant_len, rows_cap,
               res_cap, DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, QUANT_GROUP: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, INT_KEYS: tl.constexpr):
    """q . k_j, fp32 [BLOCK_M, BLOCK_N], for keys ``n`` = ``n0`` + 0..BLOCK_N-1 of head row ``bh``, from the
    query's halves ``q_lo``, ``q_hi`` [BLOCK_M, BLOCK_H] in ``DTYPE`` (``INT_KEYS``: codes scored from the fold
    rows' fp32 halves ``fold_lo``, ``fold_hi``, ``int4_keys.load_fold_rows``). ``KS``/``KZ``: scales and minima per
    (key group, channel) [B, Hkv, rows_cap / G, D]; ``KR``: the residual window [B, Hkv, res_cap, D] for keys
    past ``quant_len``. The tile lies in one key group and is all codes or all residual (the launcher's
    BLOCK_N divides the group, and quant_len is a multiple of it). Codes are loaded under that tile-uniform test
    alone: keys off ``kv_ok`` in a tile of codes are stored tokens (finite scores, masked to -inf by the caller),
    and per-key masks would cost the loop their zeroing."""
    HALF: tl.constexpr = (HEAD_DIM + 1) // 2
    quant = n * 0 + n0 < quant_len  # a tensor compare (the interpreter's n0 is an int)
    # The tile's group: one [D] row of scales and one of minima, broadcast over its keys (a [BLOCK_N, D]
    # gather moved 8x the code bytes: 2 x 2-byte scale and minimum per 0.5-byte code).
    grp_off = (bh * (rows_cap // QUANT_GROUP) + n0 // QUANT_GROUP) * HEAD_DIM
    in_codes = h * 0 + n0 < quant_len  # a tensor compare (the interpreter's n0 is an int)
    scale_lo, scale_hi = _load_row_halves(KS + grp_off, in_codes, h, HALF, HEAD_DIM)
    low_lo, low_hi = _load_row_halves(KZ + grp_off, in_codes, h, HALF, HEAD_DIM)
    if INT_KEYS:
        s = int4_keys.code_scores(k_base, n, quant, h, stride_n, fold_lo, fold_hi, scale_lo, scale_hi,
                                  low_lo, low_hi, HALF, q_lo.shape[0] // fold_lo.shape[0])
    else:  # a known zero: the opaque one would cost the key path instructions
        c_lo, c_hi = _load_codes(k_base, n, quant, h, stride_n, quant_len * 0, HALF, DTYPE, UPCAST)
        k_lo = dequantize(c_lo, scale_lo[None, :], low_lo[None, :], DTYPE, UPCAST)
        k_hi = dequantize(c_hi, scale_hi[None, :], low_hi[None, :], DTYPE, UPCAST)
        s = mma(q_lo, tl.trans(k_lo), PRECISION, UPCAST) + mma(q_hi, tl.trans(k_hi), PRECISION, UPCAST)
    if n0 >= quant_len:
        # A branch, so the (unpipelined) residual load is issued for that one tile only, not as a
        # predicated-off load (a zero-filled [BLOCK_N, D] shared-memory stage) on every tile.
        r_lo, r_hi = load_halves(KR + (bh * res_cap + (n - quant_len))[:, None] * HEAD_DIM, kv_ok[:, None],
                                 h[None, :], HALF, HEAD_DIM)
        s = mma(q_lo, tl.trans(r_lo), PRECISION, UPCAST) + mma(q_hi, tl.trans(r_hi), PRECISION, UPCAST)
    return s


@triton.jit
def load_values(VS, VZ, VR, v_base, bh, n0, n, kv_ok, h, stride_n, quant_len, rows_cap, res_cap,
                DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Value tile for the folded product: (x_lo, x_hi [BLOCK_N, BLOCK_H], scale, min [BLOCK_N]) with value
    = x * scale + min: codes 0..15 (``DTYPE``: exact; fp32 under ``UPCAST``) with the token's scale and minimum, or
    for the residual window past ``quant_len`` the stored rows with scale 1, min 0 (all codes or all residual,
    as ``key_scores``). Keys masked inside a tile of codes (past the split, ``kv_ok``) are read as stored: tokens
    before ``quant_len``, finite, weighted 0 by the caller. A tile-uniform mask keeps the masked-load zeroing out
    of the loop."""
    HALF: tl.constexpr = (HEAD_DIM + 1) // 2
    quant = n * 0 + n0 < quant_len  # a tensor compare (the interpreter's n0 is an int)
    x_lo, x_hi = _load_value_blocks(v_base, n0, quant_len, h, stride_n, opaque_zero(quant_len), HALF, DTYPE, UPCAST,
                                    n.shape[0])
    scale = tl.load(VS + bh * rows_cap + n, mask=quant, other=0.0).to(tl.float32)
    low = tl.load(VZ + bh * rows_cap + n, mask=quant, other=0.0).to(tl.float32)
    if n0 >= quant_len:
        r_lo, r_hi = load_halves(VR + (bh * res_cap + (n - quant_len))[:, None] * HEAD_DIM, kv_ok[:, None],
                                 h[None, :], HALF, HEAD_DIM)
        x_lo = r_lo.to(x_lo.dtype)
        x_hi = r_hi.to(x_hi.dtype)
        scale = scale * 0.0 + 1.0
    return x_lo, x_hi, scale, low


# Lazy rescaling (as FlashAttention-4): a row's frame m_i moves only when a tile's scores pass it by more than
# this (natural log), so weights stay <= e^8 (bf16 / fp16 products and fp32 sums hold them) and most tiles skip
# the rescale of l, the output halves and the minima's sum (a warp-uniform branch).
LAZY_RESCALE = tl.constexpr(8.0)


@triton.jit
def lazy_softmax(s, m_i, l_i, acc_lo, acc_hi, min_i):
    """This tile's weights p = exp(s - m_i) [BLOCK_M, BLOCK_N] and the running state, the frame m_i moved (and
    l_i, the output halves, sum p . min_v rescaled) only when some row's scores pass it by ``LAZY_RESCALE``:
    (m_i, l_i, acc_lo, acc_hi, min_i, p). Rows with nothing attended keep m = -inf and weights 0."""
    m_tile = reduce_max(s, axis=1)
    if reduce_max((m_tile > m_i + LAZY_RESCALE).to(tl.int32), axis=0) > 0:
        m_new = tl.maximum(m_i, m_tile)
        alpha = tl.exp(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
        l_i = l_i * alpha
        acc_lo = acc_lo * alpha[:, None]
        acc_hi = acc_hi * alpha[:, None]
        min_i = min_i * alpha
        m_i = m_new
    p = tl.exp(s - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
    return m_i, l_i + reduce_sum(p, axis=1), acc_lo, acc_hi, min_i, p


@triton.jit
def accumulate_values(p, acc_lo, acc_hi, min_i, VS, VZ, VR, v_base, bh, n0, n, kv_ok, h, stride_n, quant_len,
                      rows_cap, res_cap, DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr, FOLD_V_SCALE: tl.constexpr):
    """The output halves and sum_j p_j min_j plus this tile's weights ``p`` [BLOCK_M, BLOCK_N] (fp32, in their
    frame: ``lazy_softmax``): acc += (p * scale_v) @ c_v, min_i += p . min_v, the codes 0..15 exact in the dtype;
    fp16 (not ``FOLD_V_SCALE``, see the kernel's KV_SCALED_ROWS): dequantized tiles, as the scheme's dequantize."""
    v_lo, v_hi, v_scale, v_min = load_values(VS, VZ, VR, v_base, bh, n0, n, kv_ok, h, stride_n, quant_len, rows_cap,
                                             res_cap, DTYPE, HEAD_DIM, UPCAST)
    if FOLD_V_SCALE:
        p_v = (p * v_scale[None, :]).to(DTYPE)
        min_i = min_i + reduce_sum(p * v_min[None, :], axis=1)
    else:
        p_v = p.to(DTYPE)
        v_lo = dequantize(v_lo, v_scale[:, None], v_min[:, None], DTYPE, UPCAST)
        v_hi = dequantize(v_hi, v_scale[:, None], v_min[:, None], DTYPE, UPCAST)
    acc_lo = mma_acc(p_v, v_lo, acc_lo, PRECISION, UPCAST)
    acc_hi = mma_acc(p_v, v_hi, acc_hi, PRECISION, UPCAST)
    return acc_lo, acc_hi, min_i
