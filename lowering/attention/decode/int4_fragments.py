"""int4 (KIVI) decode attention in Gluon: code words loaded straight into the tensor cores' operand registers.

The split-KV decode of ``kernel.py``'s ``KV_INT4`` path for its common case (bf16, at most 8 query heads per KV
head, D = 64 or 128, one query position, a per-key mask or none: ``lowering.core.operands.int4_fragments_serve``),
rebuilt so that no tile goes through shared memory. Each program is one warp: (batch, KV head, split); stage 2 is
``merge_splits_kernel``. Every operand, the accumulators and the output come in two channel halves (below HALF =
D / 2 and from it: a code byte's low and high nibbles), so a half's operand is freed before the next is built.

The mma.m16n8k16 operands are built in registers from the words as stored (``lowering/storage/int4.py``):

- Scores S = Q K^T [16 rows, 32 keys] (8 real rows: the MMA's padding rows 8..15 are dropped after it). Lane
  4 g + t reads key g + 8 j (j = 0..3) as ``HALF / 16`` int32 words of its row, bytes (HALF / 4) t .. + HALF / 4:
  one vector load. Each word's middle bytes are swapped (one ``prmt``); then ``(x >> s) & 0x000F000F | 0x43004300``
  for s = 0, 8, 4, 12 is a bf16 pair 128 + c of bytes (0, 1) or (2, 3), low or high nibbles: the B operand's k
  pairs. The reduction index k is a permutation of the channels (``key_channel``): k = HALF hi + 16 w + 8 p + 2 t
  + e holds channel HALF hi + (HALF / 4) t + 4 w + 2 p + e (a pair is two adjacent channels, so a group's scales
  load as pairs), and the query is loaded in that order. Keys are dequantized as
  ``dequantize_groups`` rounds them: fma(c, scale, min) in bf16 (the scheme's unsplit path, which the Triton
  kernel takes under the interpreter: the twin).
- Output O^T = V^T P^T [D channels, 8 rows]: value word (c, t) of a 16-token block holds keys 2t, 2t+1 (bytes 0, 2)
  and 2t+8, 2t+9 (bytes 1, 3) of channels c and c + HALF (``Int4Kivi.VALUE_SLOTS``): the A operand's pairs.
  P^T, the weights times each token's value scale rounded to bf16, is S's own accumulator registers (no
  shuffle); sum_j p_j min_j is one running value per row, as ``int4_tiles.accumulate_values``.
- Softmax in the log2 domain with FlashAttention-4's lazy rescaling (``int4_tiles.LAZY_RESCALE``).

Follows BitDecoding (Du et al., arXiv 2503.18773: packed words in Tensor Core operand order, ``lop3`` with a magic
number, GQA heads in the MMA's M) on kvpass's KIVI layout. GPU only: the CPU interpreter cannot run Gluon; the
launcher (``fragments.py``) takes this kernel on CUDA where the scheme offers it and it compiles, the Triton kernel
otherwise; tests/lowering/storage/test_int4_fragments.py replays its index program in torch.
"""
from __future__ import annotations

import functools
import math

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from lowering.core import operands

MASK_NONE = gl.constexpr(operands.MASK_NONE)
MASK_BOOL = gl.constexpr(operands.MASK_BOOL)
TILE = gl.constexpr(32)  # keys per step: one KIVI key group
LOG2E = gl.constexpr(math.log2(math.e))
LAZY_RESCALE_LOG2 = gl.constexpr(8.0 * math.log2(math.e))  # int4_tiles.LAZY_RESCALE in log2 units
FINITE_FLOOR = gl.constexpr(-3.0e38)  # an additive mask's finfo.min stays finite in the log2 domain

_MMA = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
MMA = gl.constexpr(_MMA)
A_OP = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=_MMA, k_width=2))
B_OP = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=_MMA, k_width=2))
# S's rows 0..7, [8, 32 keys]: lane 4 g + t holds row g, keys 8 j + 2 t + e (registers e, j).
S8 = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1], [0, 8], [0, 16]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
    warp_bases=[], block_bases=[], shape=[8, 32]))


def _bits(n: int) -> list[int]:
    return [1 << i for i in range(n.bit_length() - 1)]


def key_words_layout(head_dim: int):
    """int32 words [key 32, t 4, w HALF / 16]: lane 4 g + t holds keys g + 8 j, words w contiguous."""
    words = head_dim // 32
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, b] for b in _bits(words)] + [[8, 0, 0], [16, 0, 0]],
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[], block_bases=[], shape=[32, 4, words])


def value_words_layout(head_dim: int):
    """int32 words [block 2, mt HALF / 16, r 2, g 8, t 4] of a 32-key value tile: word (channel 16 mt + 8 r + g, t)."""
    tiles = head_dim // 32
    return gl.DistributedLinearLayout(
        reg_bases=[[1, 0, 0, 0, 0]] + [[0, b, 0, 0, 0] for b in _bits(tiles)] + [[0, 0, 1, 0, 0]],
        lane_bases=[[0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 0, 0, 4, 0]],
        warp_bases=[], block_bases=[], shape=[2, tiles, 2, 8, 4])


def scale_layout(head_dim: int):
    """bf16 [hi 2, w HALF / 16, t 4, j 4] of a key group's scales: channel HALF hi + (HALF / 4) t + 4 w + j, the 4
    channels j of one (hi, w) contiguous in a lane (one 8-byte load); the same in every g."""
    words = head_dim // 32
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2]] + [[0, b, 0, 0] for b in _bits(words)] + [[1, 0, 0, 0]],
        lane_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        warp_bases=[], block_bases=[], shape=[2, words, 4, 4])


@functools.cache
def constants(head_dim: int) -> dict:
    """The layouts a launch passes for ``head_dim`` (constexprs), built once per head dim (read, never changed)."""
    return dict(KW_LAYOUT=key_words_layout(head_dim), VW_LAYOUT=value_words_layout(head_dim),
                SC_LAYOUT=scale_layout(head_dim))


def key_channel(k, HALF):
    """The channel that MMA reduction index k holds (module docstring); host or device integers."""
    hi = k // HALF
    w = (k % HALF) // 16
    p = (k // 8) % 2
    t = (k // 2) % 4
    e = k % 2
    return hi * HALF + t * (HALF // 4) + w * 4 + 2 * p + e


@gluon.jit
def _channel(k, HALF: gl.constexpr):
    """``key_channel`` on the device."""
    return (k // HALF) * HALF + ((k // 2) % 4) * (HALF // 4) + ((k % HALF) // 16) * 4 + ((k // 8) % 2) * 2 + k % 2


@gluon.jit
def _exp2(x):
    """2^x, one MUFU.EX2 (flushing results below 2^-126 to 0)."""
    return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _bf16_halves(x):
    """int32 -> its two 16-bit halves as bf16 (a register split, no instruction)."""
    return gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [x], dtype=(gl.bfloat16, gl.bfloat16),
                                     is_pure=True, pack=1)


@gluon.jit
def _swap_middle_bytes(x):
    """int32 bytes (b0, b1, b2, b3) -> (b0, b2, b1, b3): one PRMT, so each nibble pair below is two adjacent bytes."""
    return gl.inline_asm_elementwise("prmt.b32 $0, $1, $1, 0x3120;", "=r,r", [x], dtype=gl.int32, is_pure=True,
                                     pack=1)


@gluon.jit
def _pairs(words, magic):
    """int32 words -> [..., p, hi]: words whose halves are the bf16 patterns 128 + c of bytes (0, 2) (p = 0) or
    (1, 3) (p = 1), low (hi = 0) or high (hi = 1) nibbles; ``magic`` 0x43004300 in a register (one LOP3 each)."""
    lo0 = (words & 0x000F000F) | magic
    lo8 = ((words >> 8) & 0x000F000F) | magic
    hi0 = ((words >> 4) & 0x000F000F) | magic
    hi8 = ((words >> 12) & 0x000F000F) | magic
    return gl.join(gl.join(lo0, lo8), gl.join(hi0, hi8))


@gluon.jit
def _split_rows(p):
    """[KP, N] pair words -> [2 KP, N] bf16: row 2 kp + e is half e of row kp."""
    e0, e1 = _bf16_halves(p)
    return gl.reshape(gl.permute(gl.join(e0, e1), (0, 2, 1)), [2 * p.shape[0], p.shape[1]])


@gluon.jit
def _split_cols(p):
    """[M, KP] pair words -> [M, 2 KP] bf16: column 2 kp + e is half e of column kp."""
    e0, e1 = _bf16_halves(p)
    return gl.reshape(gl.join(e0, e1), [p.shape[0], 2 * p.shape[1]])


@gluon.jit
def _dequantize_keys(pairs, scale, low, HALF: gl.constexpr):
    """One channel half's key pairs [w, p, t, key] -> the B operand [HALF (k order), 32 keys]: fma(c, scale, min) in
    bf16, c the pattern 128 + c minus 128 (exact), as ``dequantize_groups`` rounds."""
    codes = gl.convert_layout(_split_rows(gl.reshape(pairs, [HALF // 2, pairs.shape[3]])), B_OP, assert_trivial=True)
    return gl.fma(codes - 128.0, scale[:, None], low[:, None])


@gluon.jit
def _value_codes(pairs, HALF: gl.constexpr):
    """One channel half's value pairs [mt, r, g, block, p, t] -> the A operand of O^T [HALF channels, 32 keys]: the
    codes c (128 + c minus 128, exact)."""
    codes = _split_cols(gl.reshape(pairs, [HALF, 16]))
    return gl.convert_layout(codes, A_OP, assert_trivial=True) - 128.0


@gluon.jit
def _key_words(k_words, k_off, n0, HALF: gl.constexpr):
    """The code words of the 32-key tile at key n0 (rows of HALF / 4 words), at ``k_off`` (``key_words_layout``)."""
    return gl.load(k_words + n0 * (HALF // 4) + k_off)


@gluon.jit
def _value_words(v_words, v_off, n0, HALF: gl.constexpr):
    """The value words of the 32-key tile at key n0 (two 16-token blocks of HALF * 4 words), at ``v_off``."""
    return gl.load(v_words + (n0 // 16) * (HALF * 4) + v_off)


@gluon.jit
def _first_rows(x):
    """x [16, N] -> rows 0..7 [8, N] (rows 8..15 of an MMA with <= 8 real rows are padding)."""
    a, b = gl.split(gl.permute(gl.reshape(x, [2, 8, x.shape[1]]), (1, 2, 0)))
    return a


@gluon.jit
def _group_halves(ptr, SC_LAYOUT: gl.constexpr, HALF: gl.constexpr):
    """A key group's row (scales or minima) as two [HALF] vectors in the key operand's k order (channels below and
    from HALF), SliceLayout(1, B_OP)."""
    W: gl.constexpr = HALF // 16
    L3: gl.constexpr = gl.SliceLayout(3, SC_LAYOUT)
    hi = gl.arange(0, 2, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
    w = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
    t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    j = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, SC_LAYOUT))))
    base = hi[:, None, None] * HALF + w[None, :, None] * 4 + t[None, None, :] * (HALF // 4)  # [hi, w, t]
    x = gl.load(ptr + base[:, :, :, None] + j[None, None, None, :])  # [hi, w, t, j]: channel base + j, j = 2 p + e
    x = gl.permute(gl.reshape(x, [2, W, 4, 2, 2]), (1, 3, 2, 4, 0))  # [w, p, t, e, hi]: k = 16 w + 8 p + 2 t + e
    lo, hi = gl.split(x)
    return (gl.convert_layout(gl.reshape(lo, [HALF]), gl.SliceLayout(1, B_OP), assert_trivial=True),
            gl.convert_layout(gl.reshape(hi, [HALF]), gl.SliceLayout(1, B_OP), assert_trivial=True))


@gluon.jit
def _attend_tile(s, kv_ok, v_lo, v_hi, v_scale, v_min, m_i, l_i, min_i, acc_lo, acc_hi, score_scale, mask_base,
                 stride_mn, n, MASK_KIND: gl.constexpr):
    """One tile's softmax step and P @ V: s [16, 32] the MMA's raw scores, v_lo / v_hi [HALF, 32] the A operands of
    O^T's two channel halves (codes or values), v_scale / v_min [32] per key (fp32; 1 and 0 for full-precision
    values)."""
    s = gl.convert_layout(_first_rows(s), S8, assert_trivial=True) * score_scale
    ok = kv_ok
    if MASK_KIND != MASK_NONE:
        mval = gl.load(mask_base + n * stride_mn, mask=kv_ok, other=0)
        if MASK_KIND == MASK_BOOL:
            ok = ok & (mval != 0)
        else:
            bias = mval.to(gl.float32)
            ok = ok & (bias != float("-inf"))
            s = s + gl.maximum(bias * LOG2E, FINITE_FLOOR)[None, :]
    s = gl.where(ok[None, :], s, float("-inf"))
    m_tile = gl.max(s, axis=1)
    if gl.max((m_tile > m_i + LAZY_RESCALE_LOG2).to(gl.int32), axis=0) > 0:
        m_new = gl.maximum(m_i, m_tile)
        alpha = _exp2(m_i - gl.where(m_new == float("-inf"), 0.0, m_new))
        l_i = l_i * alpha
        min_i = min_i * alpha
        alpha_o = gl.convert_layout(alpha, gl.SliceLayout(0, MMA))[None, :]
        acc_lo = acc_lo * alpha_o
        acc_hi = acc_hi * alpha_o
        m_i = m_new
    p = _exp2(s - gl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
    l_i = l_i + gl.sum(p, axis=1)
    min_i = min_i + gl.sum(p * v_min[None, :], axis=1)
    p_v = (p * v_scale[None, :]).to(gl.bfloat16)
    p_t = gl.convert_layout(gl.permute(p_v, (1, 0)), B_OP, assert_trivial=True)  # [32 keys, 8 rows]
    acc_lo = mma_v2(v_lo, p_t, acc_lo)
    acc_hi = mma_v2(v_hi, p_t, acc_hi)
    return m_i, l_i, min_i, acc_lo, acc_hi


@gluon.jit(do_not_specialize=["kv_len", "keys_per_split", "quant_len", "rows_cap", "res_cap"])
def int4_decode_kernel(
    Q, K, V, Mask, Out, Part, KS, VS, KZ, VZ, KR, VR,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_mb, stride_mn,
    num_kv_heads, kv_len, keys_per_split, sm_scale, quant_len, rows_cap, res_cap,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, MASK_KIND: gl.constexpr, SPLIT_OUTPUT: gl.constexpr,
    KW_LAYOUT: gl.constexpr, VW_LAYOUT: gl.constexpr, SC_LAYOUT: gl.constexpr, PREFETCH: gl.constexpr = False,
):
    """One program per (b * Hkv + kv head, split); arguments as ``kernel.decode_attention_split_kernel``'s for
    ``KV_INT4`` with Lq = 1 (``stride_qh``: a head's row), the mask a per-key [B, L] view (strides mb, mn).
    ``PREFETCH``: the next tile's key and value words are loaded before this tile's arithmetic (registers double
    buffered; the last tile's words are loaded twice instead of a masked load in the loop)."""
    HALF: gl.constexpr = HEAD_DIM // 2
    W: gl.constexpr = HALF // 16  # key words per lane and key
    MT: gl.constexpr = HALF // 16  # value m-tiles per channel half
    pid = gl.program_id(0)
    split = gl.program_id(1)
    b = (pid // num_kv_heads).to(gl.int64)
    kv_head = (pid % num_kv_heads).to(gl.int64)
    bh = b * num_kv_heads + kv_head
    magic = (quant_len >> 31) | 0x43004300  # a register the compiler cannot fold: one LOP3 per pair
    score_scale = sm_scale * LOG2E

    # The query rows as two A operands [16, HALF] (channels below and from HALF), in the key operand's k order.
    r = gl.arange(0, 16, layout=gl.SliceLayout(1, A_OP))
    kq = gl.arange(0, HALF, layout=gl.SliceLayout(0, A_OP))
    q_rows = Q + b * stride_qb + (kv_head * GROUP + r)[:, None] * stride_qh + _channel(kq, HALF)[None, :]
    q_lo = gl.load(q_rows, mask=(r < GROUP)[:, None], other=0.0)
    q_hi = gl.load(q_rows + HALF, mask=(r < GROUP)[:, None], other=0.0)

    # Word offsets of a key tile (int32 units) and of a value tile (two 16-token blocks [HALF, 4 words]).
    n_w = gl.arange(0, 32, layout=gl.SliceLayout(1, gl.SliceLayout(2, KW_LAYOUT)))
    t_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, KW_LAYOUT)))
    w_w = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(1, KW_LAYOUT)))
    k_off = n_w[:, None, None] * (HALF // 4) + t_w[None, :, None] * (HALF // 16) + w_w[None, None, :]
    k_words = (K + b * stride_kb + kv_head * stride_kh).to(gl.pointer_type(gl.int32))
    V4: gl.constexpr = gl.SliceLayout(4, VW_LAYOUT)
    blk = gl.arange(0, 2, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, V4))))
    mt = gl.arange(0, MT, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, V4))))
    rr = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, V4))))
    g = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, V4))))
    t_v = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, VW_LAYOUT)))))
    c_v = mt[None, :, None, None] * 16 + rr[None, None, :, None] * 8 + g[None, None, None, :]
    v_off = (blk[:, None, None, None] * (HALF * 4) + c_v * 4)[:, :, :, :, None] + t_v[None, None, None, None, :]
    v_words = (V + b * stride_vb + kv_head * stride_vh).to(gl.pointer_type(gl.int32))

    keys = gl.arange(0, TILE, layout=gl.SliceLayout(0, S8))
    mask_base = Mask + b * stride_mb
    m_i = gl.full([8], float("-inf"), gl.float32, layout=gl.SliceLayout(1, S8))
    l_i = gl.zeros([8], gl.float32, layout=gl.SliceLayout(1, S8))
    min_i = gl.zeros([8], gl.float32, layout=gl.SliceLayout(1, S8))
    acc_lo = gl.zeros([HALF, 8], gl.float32, layout=MMA)  # O^T: channels x rows, below HALF
    acc_hi = gl.zeros([HALF, 8], gl.float32, layout=MMA)  # and from HALF

    start = split * keys_per_split
    end = gl.minimum(start + keys_per_split, kv_len)
    stop = gl.minimum(end, quant_len)
    if PREFETCH:  # the first tile's words (none where the split holds no code tile), the last tile's start
        k_next = gl.load(k_words + start * (HALF // 4) + k_off, mask=(k_off * 0 + start) < stop, other=0)
        v_next = gl.load(v_words + (start // 16) * (HALF * 4) + v_off, mask=(v_off * 0 + start) < stop, other=0)
        last = start + gl.maximum(stop - start - 1, 0) // TILE * TILE
    for n0 in range(start, stop, TILE):
        if PREFETCH:
            k_raw = k_next
            v_now = v_next
            n_next = gl.minimum(n0 + TILE, last)
            k_next = _key_words(k_words, k_off, n_next, HALF)
            v_next = _value_words(v_words, v_off, n_next, HALF)
        else:
            k_raw = _key_words(k_words, k_off, n0, HALF)
        words = _swap_middle_bytes(k_raw)
        k_lo, k_hi = gl.split(gl.permute(_pairs(words, magic), (2, 3, 1, 0, 4)))  # [w, p, t, key] x (lo, hi)
        grp = (bh * (rows_cap // TILE) + n0 // TILE) * HEAD_DIM
        scale_lo, scale_hi = _group_halves(KS + grp, SC_LAYOUT, HALF)
        low_lo, low_hi = _group_halves(KZ + grp, SC_LAYOUT, HALF)
        s = mma_v2(q_lo, _dequantize_keys(k_lo, scale_lo, low_lo, HALF), gl.zeros([16, TILE], gl.float32, layout=MMA))
        s = mma_v2(q_hi, _dequantize_keys(k_hi, scale_hi, low_hi, HALF), s)
        n = n0 + keys
        v_scale = gl.load(VS + bh * rows_cap + n).to(gl.float32)
        v_min = gl.load(VZ + bh * rows_cap + n).to(gl.float32)
        if PREFETCH:
            vw = v_now
        else:
            vw = _value_words(v_words, v_off, n0, HALF)
        v_lo, v_hi = gl.split(gl.permute(_pairs(vw, magic), (1, 2, 3, 0, 5, 4, 6)))  # [mt, r, g, blk, p, t] x halves
        m_i, l_i, min_i, acc_lo, acc_hi = _attend_tile(
            s, n < end, _value_codes(v_lo, HALF), _value_codes(v_hi, HALF), v_scale, v_min, m_i, l_i, min_i, acc_lo,
            acc_hi, score_scale, mask_base, stride_mn, n, MASK_KIND)
    if end > quant_len:  # the residual window: at most one tile, keys and values in the query's dtype
        n0 = gl.maximum(start, quant_len)
        kk = gl.arange(0, HALF, layout=gl.SliceLayout(1, B_OP))
        nk = n0 + gl.arange(0, TILE, layout=gl.SliceLayout(0, B_OP))
        k_rows = KR + (bh * res_cap + nk - quant_len)[None, :] * HEAD_DIM + _channel(kk, HALF)[:, None]
        k_lo = gl.load(k_rows, mask=(nk < end)[None, :], other=0.0)
        k_hi = gl.load(k_rows + HALF, mask=(nk < end)[None, :], other=0.0)
        s = mma_v2(q_hi, k_hi, mma_v2(q_lo, k_lo, gl.zeros([16, TILE], gl.float32, layout=MMA)))
        ch = gl.arange(0, HALF, layout=gl.SliceLayout(1, A_OP))
        nv = n0 + gl.arange(0, TILE, layout=gl.SliceLayout(0, A_OP))
        v_rows = VR + (bh * res_cap + nv - quant_len)[None, :] * HEAD_DIM + ch[:, None]
        v_lo = gl.load(v_rows, mask=(nv < end)[None, :], other=0.0)
        v_hi = gl.load(v_rows + HALF, mask=(nv < end)[None, :], other=0.0)
        n = n0 + keys
        one = gl.full([TILE], 1.0, gl.float32, layout=gl.SliceLayout(0, S8))
        m_i, l_i, min_i, acc_lo, acc_hi = _attend_tile(s, n < end, v_lo, v_hi, one, one * 0.0, m_i, l_i, min_i,
                                                       acc_lo, acc_hi, score_scale, mask_base, stride_mn, n, MASK_KIND)

    # Rows: lane sums of l and sum p . min, then O = (O^T + min) / l, written as rows of Out or Part.
    OUT_ROWS: gl.constexpr = gl.SliceLayout(0, MMA)
    l_o = gl.convert_layout(l_i, OUT_ROWS)
    min_o = gl.convert_layout(min_i, OUT_ROWS)
    m_o = gl.convert_layout(m_i, OUT_ROWS)
    norm = gl.where(l_o == 0.0, 1.0, l_o)
    o_lo = (acc_lo + min_o[None, :]) / norm[None, :]
    o_hi = (acc_hi + min_o[None, :]) / norm[None, :]
    ch_o = gl.arange(0, HALF, layout=gl.SliceLayout(1, MMA))
    row = gl.arange(0, 8, layout=OUT_ROWS)
    out_row = bh * GROUP + row  # (b * Hq + head) for Lq = 1
    row_ok = row < GROUP
    if SPLIT_OUTPUT:
        num_splits = gl.num_programs(1)
        total_rows = gl.num_programs(0) * GROUP
        lse = gl.where(l_o == 0.0, float("-inf"), (m_o + gl.log2(norm)) / LOG2E)
        part_rows = Part + ((out_row * num_splits + split) * HEAD_DIM)[None, :] + ch_o[:, None]
        gl.store(part_rows, o_lo, mask=row_ok[None, :])
        gl.store(part_rows + HALF, o_hi, mask=row_ok[None, :])
        gl.store(Part + total_rows.to(gl.int64) * num_splits * HEAD_DIM + out_row * num_splits + split, lse,
                 mask=row_ok)
    else:
        out_rows = Out + (out_row * HEAD_DIM)[None, :] + ch_o[:, None]
        gl.store(out_rows, o_lo.to(Out.dtype.element_ty), mask=row_ok[None, :])
        gl.store(out_rows + HALF, o_hi.to(Out.dtype.element_ty), mask=row_ok[None, :])
