"""Decode scoring fused with attention for the budgeted caches (h2o, adore): device code only.

A budgeted decode step needs two things from the same scores s = scale q.k + mask: the weight every
*candidate* key receives, summed over the query heads of its KV head (H2O's and ADORE's score), and the
attention output over the *kept* keys, chosen from those weights (so the softmax of the weights and the
one of the output have different normalisers). Reading the keys once for both:

1. ``score_keys_kernel`` (split-KV, GQA: one program reads a KV head's key block once for all its query
   heads) writes the raw scores S [B, Hq, Lq, C] in fp32 and, per split, the log-sum-exp of its scores.
   Keys are either in the query's dtype or int8 rows times a per-row fp32 scale (ADORE's cold store,
   dequantized in registers as ``lowering.storage.int8.dequantize_rows`` does: fp32 product rounded once
   to the dtype). The mask is read at each candidate's logical position (``Pos``).
2. ``key_weights_kernel`` merges the splits' LSE per row and sums exp(S - LSE) over the rows of each KV
   head: the weights [B, Hkv, C].
3. (selection, in torch) then ``kept_attention_kernel``: softmax over the kept columns of S (gathered by
   candidate index) times the kept values; split-KV partials merge with ``merge_splits_kernel`` of
   ``lowering.attention.device.merge``.

Bytes per candidate key at Hq/Hkv = 4, Lq = 1, D = 128, bf16: the keys once (256 B; 128 B for int8 cold
rows), S written once and read twice (3 x 4 B x 4 rows = 48 B), the values of kept keys once (256 B).
Re-reading the keys instead (the reference: explicit weights, then the fused decode attention) costs
256 B more per key; a two-pass kernel (LSE first, then weights) would read them twice too. Storing S costs
4 B per query row and key, 1/16 of a bf16 key per row of the group.

Masks follow ``lowering.formats.budgeted``: bool True = attend, additive values below ``MASKED_BELOW`` (-1e4: HF's
finfo.min fills) mean "not attended"; a row with no attended key has weight 0 everywhere and output 0.
Scores stay in the natural-log domain (see ``lowering.attention.decode.kernel``).
"""

import triton
import triton.language as tl

from lowering.attention.device.merge import part_offsets
from lowering.attention.device.reductions import mma, reduce_max, reduce_sum
from lowering.core import limits, operands

KEYS_FULL = tl.constexpr(operands.KEYS_FULL)
KEYS_INT8_ROWS = tl.constexpr(operands.KEYS_INT8_ROWS)
MASK_NONE = tl.constexpr(operands.MASK_NONE)
MASK_BOOL = tl.constexpr(operands.MASK_BOOL)
MASK_ADDITIVE = tl.constexpr(operands.MASK_ADDITIVE)
MASKED_BELOW = tl.constexpr(limits.MASKED_BELOW)  # jit code reads constexpr globals only


@triton.jit
def _group_rows(pid, num_kv_heads, q_len, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's KV head and query rows: row r of the tile is query i of head kv_head * GROUP + g;
    ``out_rows`` are the rows of a contiguous [B, Hq, Lq, ...] tensor ((b * Hq + head) * Lq + i)."""
    num_rows = GROUP * q_len
    row_blocks = (num_rows + BLOCK_M - 1) // BLOCK_M
    bh = pid // row_blocks
    rows = (pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = (bh // num_kv_heads).to(tl.int64)
    kv_head = (bh % num_kv_heads).to(tl.int64)
    g = rows // q_len
    i = rows - g * q_len
    out_rows = (bh * num_rows + rows).to(tl.int64)
    return b, kv_head, kv_head * GROUP + g, i, rows < num_rows, out_rows


@triton.jit(do_not_specialize=["seg_len", "col_offset", "num_cols", "keys_per_split", "split_offset",
                               "total_splits"])
def score_keys_kernel(
    Q, K, KS, Pos, Mask,  #
    S,  # fp32 [B, Hq, Lq, num_cols] contiguous: raw scores, -inf where not attended
    Lse,  # fp32 [B, Hq, Lq, total_splits]: log-sum-exp of each split's scores
    stride_qb, stride_qh, stride_qm,  # q [B, Hq, Lq, D], last dim contiguous
    stride_kb, stride_kh, stride_kn,  # keys of this segment [B, Hkv, seg_len, D], last dim contiguous
    stride_sb, stride_sh,  # KEYS_INT8_ROWS: scales [B, Hkv, seg_len], last dim contiguous
    stride_pb, stride_ph,  # Pos: logical position of every candidate column [B, Hkv, num_cols]
    stride_mb, stride_mh, stride_mm, stride_mn,  # mask viewed as [B, Hq, Lq, L], 0 on broadcast dims
    num_kv_heads, q_len, seg_len, col_offset, num_cols, keys_per_split, split_offset, total_splits, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_KIND: tl.constexpr, KEY_FORMAT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program per (batch, KV head, row block, split) of one key segment: the segment's keys are the
    candidate columns [col_offset, col_offset + seg_len)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs 16 x 16 tiles")
    b, kv_head, head, i, row_ok, out_rows = _group_rows(tl.program_id(0), num_kv_heads, q_len, GROUP, BLOCK_M)
    split = tl.program_id(1)
    dtype = Q.dtype.element_ty
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + i[:, None] * stride_qm + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + kv_head * stride_kh
    if MASK_KIND != MASK_NONE:
        m_base = Mask + b * stride_mb + head * stride_mh + i * stride_mm  # [BLOCK_M] row pointers
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)

    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, seg_len)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        col = col_offset + n
        keep = row_ok[:, None] & n_ok[None, :]
        if MASK_KIND != MASK_NONE:
            pos = tl.load(Pos + b * stride_pb + kv_head * stride_ph + col, mask=n_ok, other=0).to(tl.int64)
            mval = tl.load(m_base[:, None] + pos[None, :] * stride_mn, mask=keep, other=0)
            if MASK_KIND == MASK_BOOL:
                keep = keep & (mval != 0)
            else:
                bias = mval.to(tl.float32)
                keep = keep & (bias >= MASKED_BELOW)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        if KEY_FORMAT == KEYS_FULL:
            k = tl.load(k_base + n[:, None] * stride_kn + d[None, :], mask=kv_mask, other=0.0)
        else:
            codes = tl.load(k_base + n[:, None] * stride_kn + d[None, :], mask=kv_mask, other=0).to(tl.float32)
            row_scale = tl.load(KS + b * stride_sb + kv_head * stride_sh + n, mask=n_ok, other=0.0)
            k = (codes * row_scale[:, None]).to(dtype)  # dequantize_rows: one fp32 product, one rounding
        s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * sm_scale
        if MASK_KIND == MASK_ADDITIVE:
            s = s + bias
        s = tl.where(keep, s, float("-inf"))
        tl.store(S + out_rows[:, None] * num_cols + col[None, :], s, mask=row_ok[:, None] & n_ok[None, :])
        m_new = tl.maximum(m_i, reduce_max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key attended yet: avoid -inf - -inf
        l_i = l_i * tl.exp(m_i - shift) + reduce_sum(tl.exp(s - shift[:, None]), axis=1)
        m_i = m_new

    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i))
    tl.store(Lse + out_rows * total_splits + split_offset + split, lse, mask=row_ok)


@triton.jit
def _merge_lse(a, b):
    top = tl.maximum(a, b)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.exp(a - shift) + tl.exp(b - shift)
    return tl.where(total == 0.0, float("-inf"), shift + tl.log(total))


@triton.jit(do_not_specialize=["num_cols", "total_splits"])
def key_weights_kernel(
    S, Lse,  # as written by score_keys_kernel
    W,  # fp32 [B, Hkv, num_cols]: sum over the KV head's query rows of exp(S - LSE), times row_scale
    q_len, num_cols, total_splits, row_scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
):
    """One program per (batch * KV head, column block)."""
    bh = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < num_cols
    num_rows = GROUP * q_len
    w = tl.full([BLOCK_N], 0.0, dtype=tl.float32)
    for r0 in range(0, num_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        out_rows = bh * num_rows + rows
        lse = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for s0 in range(0, total_splits, SPLIT_BLOCK):
            sp = s0 + tl.arange(0, SPLIT_BLOCK)
            part = tl.load(Lse + out_rows[:, None] * total_splits + sp[None, :],
                           mask=row_ok[:, None] & (sp < total_splits)[None, :], other=float("-inf"))
            top = reduce_max(part, axis=1)
            shift = tl.where(top == float("-inf"), 0.0, top)
            total = reduce_sum(tl.exp(part - shift[:, None]), axis=1)
            lse = _merge_lse(lse, tl.where(total == 0.0, float("-inf"), shift + tl.log(total)))
        s = tl.load(S + out_rows[:, None] * num_cols + cols[None, :], mask=row_ok[:, None] & c_ok[None, :],
                    other=float("-inf"))
        # A row with no attended key has lse = -inf and every s = -inf: exp(-inf - 0) = 0.
        w += reduce_sum(tl.exp(s - tl.where(lse == float("-inf"), 0.0, lse)[:, None]), axis=0)
    tl.store(W + bh * num_cols + cols, w * row_scale, mask=c_ok)


@triton.jit(do_not_specialize=["kept_len", "num_cols", "keys_per_split"])
def kept_attention_kernel(
    S, Idx, V,  #
    Out,  # [B, Hq, Lq, D] contiguous; written only when SPLIT_OUTPUT is off
    Part,  # fp32 partial states in the split-KV layout (``part_offsets``); when SPLIT_OUTPUT is on
    stride_ib, stride_ih,  # Idx: candidate column of every kept token [B, Hkv, kept_len], last dim contiguous
    stride_vb, stride_vh, stride_vn,  # kept values [B, Hkv, kept_len, D], last dim contiguous
    num_kv_heads, q_len, kept_len, num_cols, keys_per_split,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT_OUTPUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Attention over the kept tokens from their stored scores: no key is read. One program per (batch,
    KV head, row block, split), online softmax in fp32, probabilities rounded to the values' dtype."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs 16 x 16 tiles")
    b, kv_head, head, i, row_ok, out_rows = _group_rows(tl.program_id(0), num_kv_heads, q_len, GROUP, BLOCK_M)
    split = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    v_base = V + b * stride_vb + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, kept_len)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        col = tl.load(Idx + b * stride_ib + kv_head * stride_ih + n, mask=n_ok, other=0).to(tl.int64)
        s = tl.load(S + out_rows[:, None] * num_cols + col[None, :], mask=row_ok[:, None] & n_ok[None, :],
                    other=float("-inf"))
        v = tl.load(v_base + n[:, None] * stride_vn + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m_i, reduce_max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - shift)
        p = tl.exp(s - shift[:, None])
        l_i = l_i * alpha + reduce_sum(p, axis=1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if SPLIT_OUTPUT:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i))
        total_rows = tl.num_programs(0) // ((GROUP * q_len + BLOCK_M - 1) // BLOCK_M) * (GROUP * q_len)
        o_off, lse_off = part_offsets(out_rows, split, tl.num_programs(1), total_rows, HEAD_DIM)
        tl.store(Part + o_off[:, None] + d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Part + lse_off, lse, mask=row_ok)
    else:
        tl.store(Out + out_rows[:, None] * HEAD_DIM + d[None, :], o.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
