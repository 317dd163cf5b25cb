"""Split-KV decode attention (FlashDecoding) in Triton: device code only.

Stage 1 (``decode_attention_split_kernel``): one program per (batch, KV head, row block, KV split). It loads
the query rows of every query head sharing the KV head (GQA/MQA read each K/V block once for all of them),
streams its range of keys ``BLOCK_N`` at a time with an online softmax in fp32 and writes a normalised
partial output with its log-sum-exp; with a single split it writes the final output and stage 2 is skipped.
Stage 2 (``lowering.attention.device.merge.merge_splits_kernel``): one program per query row merges the splits.

Softmax states are ``(o, lse)`` (``lowering/attention/device/merge.py``); a row whose keys are all masked
comes out as zeros, as torch's math SDPA does. Scores stay in the natural-log domain: an additive mask of
``finfo(float32).min`` would overflow to ``-inf`` once multiplied by log2(e).

Packed caches (``KV_FORMAT``, a constexpr switch of the tile loader; the softmax, masking, split and merge
code is shared; values from ``lowering.core.operands``). K/V tiles are loaded in their stored form:

- ``KV_SCALED_ROWS``: int8 or fp8 codes [B, Hkv, L, D] times a per-token fp32 scale (``lowering/storage/int8.py``,
  ``fp8.py``). s_j = (q . c_j) * (scale_k[j] * sm_scale); the value scale folds into the weights,
  acc += (p * scale_v) @ c_v, so the kernel attends over the exact products code * scale. ``F16_CODES`` (fp8
  codes under a bf16 query): both MMAs in fp16, since e4m3 converts to fp16 in one instruction per pair and to
  bf16 only through fp32; the query and the weights p * scale_v enter fp16 scaled per row by powers of two
  (``lowering.attention.device.fixed_point.f16_rows``), undone on the fp32 products. ``SPLIT_QUERY``
  (int8 codes): q ~ step * (256 hi + lo) with int8 hi, lo (``lowering.attention.device.fixed_point.split_query``),
  scores from two int8 MMAs with exact int32 sums (error bound: ``Int8.kernel_query_error``). ``VALUE_BLOCK``:
  values in 16-token blocks, token-minor (``lowering/storage/token_blocks.py``), read as the P @ V operand.
  Rows stored rotated (``ROTATE_STAGES``): the query is rotated into the stored basis as it is loaded and the
  output turned back as it is written, in registers (``lowering/attention/device/rotation.py``).
- ``KV_INT4``: KIVI, two 4-bit codes per byte (byte j: channels j and j + ceil(D / 2)), keys per channel in
  groups of ``QUANT_GROUP`` tokens, values per token, plus the full-precision residual window past
  ``quant_len`` (``lowering/storage/int4.py``); tiles, query and accumulator come in channel halves
  (``int4_tiles.py``; integer key scores with ``SPLIT_QUERY``: ``int4_keys.py``). ``BLOCK_N`` divides
  ``QUANT_GROUP``, so a tile's scales and minima are one [D] vector each.
- ``KV_ALIGNED``: 12-bit codes split into an int8 high part and a 4-bit low part stored apart; a block's low
  parts are loaded only when a bound says its contribution needs them (``lowering/storage/aligned.py``).

Follows Dao et al., "Flash-Decoding for long-context inference" (2023) and the state merge of
Ye et al., FlashInfer (arXiv 2501.01005), section 3.1.
"""

import triton
import triton.language as tl

from lowering.attention.decode import int4_keys, int4_tiles
from lowering.attention.decode.packed_tiles import load_aligned, load_aligned_low, load_code_blocks, load_codes
from lowering.attention.device.fixed_point import f16_rows, split_query
from lowering.attention.device.merge import part_offsets
from lowering.attention.device.reductions import mma, reduce_max, reduce_sum
from lowering.attention.device.rotation import rotate, signs
from lowering.core import operands

MASK_NONE = tl.constexpr(operands.MASK_NONE)
MASK_BOOL = tl.constexpr(operands.MASK_BOOL)
MASK_ADDITIVE = tl.constexpr(operands.MASK_ADDITIVE)
KV_FULL = tl.constexpr(operands.KV_FULL)
KV_SCALED_ROWS = tl.constexpr(operands.KV_SCALED_ROWS)
KV_INT4 = tl.constexpr(operands.KV_INT4)
KV_ALIGNED = tl.constexpr(operands.KV_ALIGNED)


@triton.jit(do_not_specialize=["kv_len", "keys_per_split", "quant_len", "res_len", "rows_cap", "res_cap"])
def decode_attention_split_kernel(
    Q, K, V, Mask,  #
    Out,  # [B, Hq, Lq, D] contiguous; written only when SPLIT_OUTPUT is off
    Part,  # fp32 partial states, see part_offsets; written only when SPLIT_OUTPUT is on
    KS, VS, KZ, VZ, KR, VR,  # packed formats' scales, minima, int4 residual / aligned low parts
    Stats,  # KV_ALIGNED: int64 [2] += (tokens whose low parts were read, tokens read)
    stride_qb, stride_qh, stride_qm,  # q [B, Hq, Lq, D], last dim contiguous
    stride_kb, stride_kh, stride_kn,  # k [B, Hkv, L, D] (packed: the codes section)
    stride_vb, stride_vh, stride_vn,  # v [B, Hkv, L, D]
    stride_mb, stride_mh, stride_mm, stride_mn,  # mask viewed as [B, Hq, Lq, L], 0 on broadcast dims
    num_kv_heads, q_len, kv_len, keys_per_split, sm_scale,  #
    quant_len, res_len,  # packed: tokens in the quantized sections (int4: full groups) and in the residual
    rows_cap, res_cap,  # packed: rows per head of those sections (>= quant_len, res_len: capacity prefixes)
    skip_error, value_bound, half_tau,  # KV_ALIGNED: see the skip rule in the loop
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows (GROUP * Lq, padded) per program, >= 16 for tl.dot
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    MASK_KIND: tl.constexpr,  # MASK_NONE, MASK_BOOL or MASK_ADDITIVE
    MASK_PER_KEY: tl.constexpr,  # the mask is the same for every row of the tile: load a [BLOCK_N] vector
    IS_CAUSAL: tl.constexpr,  # top-left aligned: query i sees keys j <= i
    SKIP_MASKED_KEYS: tl.constexpr,  # predicate K/V loads off for keys no row attends
    SPLIT_OUTPUT: tl.constexpr,  # write (o, lse) partials for stage 2, else the final output
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    KV_FORMAT: tl.constexpr = 0,  # KV_FULL, KV_SCALED_ROWS, KV_INT4 or KV_ALIGNED
    QUANT_GROUP: tl.constexpr = 32,  # KV_INT4: tokens per key group
    FOLD_V_SCALE: tl.constexpr = True,  # KV_SCALED_ROWS, KV_INT4: value scales into the weights (not fp16)
    ROTATE_STAGES: tl.constexpr = 0,  # rows stored rotated (int8): log2(D); 0 for none
    ROTATE_SHIFT: tl.constexpr = 0,  # and the query's / output's scaling 2^-shift (lowering/core/rotation.py)
    ROTATE_QUERY_BY_MMA: tl.constexpr = False,  # the query by one MMA against H instead of the butterfly
    VALUE_BLOCK: tl.constexpr = 0,  # KV_SCALED_ROWS: values in token blocks of this size (stride_vn: a block's)
    SPLIT_QUERY: tl.constexpr = False,  # int8 codes / KV_INT4: key scores by int8 MMAs of the query's split
    FOLD_ROWS: tl.constexpr = 16,  # KV_INT4 with SPLIT_QUERY: rows folded (power of two >= GROUP * Lq, <= BLOCK_M)
    F16_CODES: tl.constexpr = False,  # KV_SCALED_ROWS, fp8 codes, bf16 query: the MMAs in fp16 (module docstring)
):
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs at least 16 rows")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs at least 16 keys")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D pads HEAD_DIM")
    tl.static_assert(MASK_KIND != MASK_NONE or not SKIP_MASKED_KEYS, "skipping keys needs a mask")

    num_rows = GROUP * q_len
    row_blocks = (num_rows + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    split = tl.program_id(1)
    bh = pid // row_blocks  # b * Hkv + kv_head
    row_block = pid % row_blocks
    b = (bh // num_kv_heads).to(tl.int64)
    kv_head = (bh % num_kv_heads).to(tl.int64)
    bh64 = b * num_kv_heads + kv_head
    dtype = Q.dtype.element_ty

    # Row r of this KV head's query tile is query position i of head kv_head * GROUP + g.
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    g = rows // q_len
    i = rows - g * q_len
    head = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q_rows = Q + b * stride_qb + head * stride_qh + i * stride_qm
    if KV_FORMAT == KV_INT4:
        # int4: channel halves h and HALF + h, as the codes store them (int4_tiles.py); with
        # SPLIT_QUERY also the FOLD_ROWS real rows the key groups' scales fold into (int4_keys.py).
        tl.static_assert(ROTATE_STAGES == 0, "int4 rows are not rotated")
        HALF: tl.constexpr = (HEAD_DIM + 1) // 2
        h = tl.arange(0, BLOCK_D // 2)
        q_lo, q_hi = int4_tiles.load_halves(q_rows[:, None], row_ok[:, None], h[None, :], HALF, HEAD_DIM)
        fold_lo, fold_hi = q_lo, q_hi
        if SPLIT_QUERY:
            fold_lo, fold_hi = int4_keys.load_fold_rows(Q, b, kv_head, row_block, q_len, stride_qb, stride_qh,
                                                        stride_qm, h, GROUP, BLOCK_M, FOLD_ROWS, HALF, HEAD_DIM)
    else:
        q = tl.load(q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if ROTATE_STAGES:  # q H 2^-shift, rounded once to the dtype: the query of the stored basis
        if ROTATE_QUERY_BY_MMA:
            q_h = mma(q, signs(BLOCK_D, HEAD_DIM).to(dtype), DOT_PRECISION, UPCAST_DOT)
            q = (q_h * (1.0 / (1 << ROTATE_SHIFT))).to(dtype)
        else:
            q = rotate(q, BLOCK_M, BLOCK_D, ROTATE_STAGES, ROTATE_SHIFT).to(dtype)
    if F16_CODES:
        q, q_unscale = f16_rows(q.to(tl.float32))
    code_dtype = tl.float16 if F16_CODES else dtype  # what KV_SCALED_ROWS codes convert to for the MMAs
    if SPLIT_QUERY and KV_FORMAT == KV_SCALED_ROWS:  # transposed once: the key tile is the MMA's left operand (smem)
        q_hi, q_lo, q_step = split_query(q)
        q_hi = tl.trans(q_hi)
        q_lo = tl.trans(q_lo)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    if MASK_KIND != MASK_NONE:
        if MASK_PER_KEY:  # HF decode: [B, 1, 1, L] broadcast over heads, one query row
            m_base = Mask + b * stride_mb
        else:
            m_base = Mask + b * stride_mb + head * stride_mh + i * stride_mm  # [BLOCK_M] row pointers

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    if KV_FORMAT == KV_INT4:  # the output's channel halves h and HALF + h
        acc = tl.full([BLOCK_M, BLOCK_D // 2], 0.0, dtype=tl.float32)
        acc_hi = tl.full([BLOCK_M, BLOCK_D // 2], 0.0, dtype=tl.float32)
        # sum_j p_j min_j, the same for every channel: one running sum per row (rescaled as l_i), added to the
        # output once at the end instead of to both accumulators per tile.
        min_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    else:
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    if KV_FORMAT == KV_ALIGNED:
        # Skip-rule state, in the same running frame as l_i: e_i bounds the output error of the low
        # parts skipped so far, c_i their weight perturbation, w_i = sum_j p_j |v_j|max.
        e_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        c_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        w_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        q_l1 = sm_scale * reduce_sum(tl.abs(q.to(tl.float32)), axis=1)  # [BLOCK_M]: |score error| <= q_l1 |dk|max
        low_tokens = tl.program_id(0) * 0  # int32 scalars: tokens whose low parts / any parts were read
        read_tokens = tl.program_id(0) * 0

    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, kv_len)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        keep = row_ok[:, None] & n_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (n[None, :] <= i[:, None])
        if MASK_KIND != MASK_NONE:
            if MASK_PER_KEY:
                # One element per key instead of a [BLOCK_M, BLOCK_N] gather.
                mval = tl.load(m_base + n * stride_mn, mask=n_ok, other=0)
                if MASK_KIND == MASK_BOOL:
                    live = mval != 0
                else:
                    bias = mval.to(tl.float32)
                    live = bias != float("-inf")
                    bias = bias[None, :]
                keep = keep & live[None, :]
            else:
                mval = tl.load(m_base[:, None] + n[None, :] * stride_mn, mask=keep, other=0)
                if MASK_KIND == MASK_BOOL:
                    keep = keep & (mval != 0)
                else:
                    bias = mval.to(tl.float32)
                    keep = keep & (bias != float("-inf"))
                live = reduce_max(keep.to(tl.int32), axis=0) > 0
        kv_ok = n_ok
        if SKIP_MASKED_KEYS:
            # A key no row attends costs no K/V traffic: predicated-off loads fetch nothing.
            kv_ok = kv_ok & live

        if KV_FORMAT == KV_SCALED_ROWS:
            # Scores of the codes, then the per-token key scale: s_j = (q . c_j) * (scale_k[j] * sm_scale).
            k_scale = tl.load(KS + bh64 * rows_cap + n, mask=kv_ok, other=0.0)
            if SPLIT_QUERY:
                # s = step * (256 (c . hi) + c . lo) * scale_k * sm_scale: the integer dots exact in int32
                # (|Q| |c| D < 2^31), the codes never converted.
                kc = tl.load(k_base + n[:, None] * stride_kn + d[None, :], mask=kv_ok[:, None] & d_ok[None, :],
                             other=0)
                s_fixed = tl.dot(kc, q_hi, out_dtype=tl.int32) * 256 + tl.dot(kc, q_lo, out_dtype=tl.int32)
                s = tl.trans(s_fixed).to(tl.float32) * q_step[:, None] * (k_scale * sm_scale)[None, :]
            else:
                k = load_codes(k_base, n, kv_ok, d, d_ok, stride_kn, code_dtype, UPCAST_DOT)
                s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * (k_scale * sm_scale)[None, :]
                if F16_CODES:
                    s = s * q_unscale[:, None]
        elif KV_FORMAT == KV_INT4:
            tl.static_assert(QUANT_GROUP % BLOCK_N == 0 and VALUE_BLOCK == 16, "int4: tiles in one key group")
            s = int4_tiles.key_scores(q_lo, q_hi, fold_lo, fold_hi, KS, KZ, KR, k_base, bh64, n0, n, kv_ok, h,
                                      stride_kn, quant_len, rows_cap, res_cap, dtype, HEAD_DIM, QUANT_GROUP,
                                      DOT_PRECISION, UPCAST_DOT, SPLIT_QUERY) * sm_scale
        else:
            if KV_FORMAT == KV_ALIGNED:
                k_code, k_step = load_aligned(k_base, KS, bh64, n, kv_ok, d, d_ok, stride_kn, rows_cap)
                k = (k_code * k_step[:, None]).to(dtype)
            else:
                k = tl.load(k_base + n[:, None] * stride_kn + d[None, :], mask=kv_ok[:, None] & d_ok[None, :],
                            other=0.0)
            s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * sm_scale
        if MASK_KIND == MASK_ADDITIVE:
            s = s + bias
        s = tl.where(keep, s, float("-inf"))

        if KV_FORMAT == KV_ALIGNED:
            # Skip rule: with the high parts only, score j errs by at most dk_j = q_l1 * skip_error *
            # step_j and value j by dv_j = skip_error * step_j (skip_error: the low part's 8 steps plus
            # the dtype roundings of both tiles). For weights p (of the high-part scores) the output
            # moves by at most sum_j p_j ((e^dk_j - 1)(A_j + |o|) + dv_j) with A_j = value_bound *
            # step_j >= |v_j|, and |o| <= sum_j p_j A_j. Skipping is allowed while, for every row,
            # E = sum p ((e^dk - 1) A + dv) <= tau/2 W and C = sum p (e^dk - 1) <= tau/2 l, W = sum p A:
            # both ratios only fall as further blocks add to W and l, and splits merge by mediants,
            # so the final output is within tau * sum_j p_j A_j of the all-low-parts output.
            v_code, v_step = load_aligned(v_base, VS, bh64, n, kv_ok, d, d_ok, stride_vn, rows_cap)
            m_hi = tl.maximum(m_i, reduce_max(s, axis=1))
            shift_hi = tl.where(m_hi == float("-inf"), 0.0, m_hi)
            alpha_hi = tl.exp(m_i - shift_hi)
            p_hi = tl.exp(s - shift_hi[:, None])
            amp = value_bound * v_step
            grow = tl.where(p_hi > 0.0, p_hi * (tl.exp(q_l1[:, None] * (skip_error * k_step)[None, :]) - 1.0), 0.0)
            e_blk = reduce_sum(grow * amp[None, :] + p_hi * (skip_error * v_step)[None, :], axis=1)
            c_blk = reduce_sum(grow, axis=1)
            w_new = w_i * alpha_hi + reduce_sum(p_hi * amp[None, :], axis=1)
            l_new = l_i * alpha_hi + reduce_sum(p_hi, axis=1)
            e_new = e_i * alpha_hi + e_blk
            c_new = c_i * alpha_hi + c_blk
            # "== 0" first: rows with nothing attended have w = l = 0, and tau = inf times 0 is NaN.
            fits = ((e_new == 0.0) | (e_new <= half_tau * w_new)) & ((c_new == 0.0) | (c_new <= half_tau * l_new))
            read_low = reduce_max((~fits).to(tl.int32), axis=0) > 0
            count = reduce_sum(kv_ok.to(tl.int32), axis=0)
            read_tokens += count
            low_tokens += tl.where(read_low, count, 0)
            if read_low:
                k_code = k_code + load_aligned_low(KR, bh64, n, kv_ok, rows_cap, HEAD_DIM, BLOCK_D)
                v_code = v_code + load_aligned_low(VR, bh64, n, kv_ok, rows_cap, HEAD_DIM, BLOCK_D)
                k = (k_code * k_step[:, None]).to(dtype)
                s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * sm_scale
                if MASK_KIND == MASK_ADDITIVE:
                    s = s + bias
                s = tl.where(keep, s, float("-inf"))
            e_blk = tl.where(read_low, 0.0, e_blk)  # read blocks add no error (and an inf bound no NaN)
            c_blk = tl.where(read_low, 0.0, c_blk)
            v = (v_code * v_step[:, None]).to(dtype)

        if KV_FORMAT == KV_INT4:  # values c * scale_v + min_v per token, folded (residual: scale 1, min 0)
            m_i, l_i, acc, acc_hi, min_i, p = int4_tiles.lazy_softmax(s, m_i, l_i, acc, acc_hi, min_i)
            acc, acc_hi, min_i = int4_tiles.accumulate_values(p, acc, acc_hi, min_i, VS, VZ, VR, v_base, bh64, n0, n,
                                                              kv_ok, h, stride_vn, quant_len, rows_cap, res_cap,
                                                              dtype, HEAD_DIM, DOT_PRECISION, UPCAST_DOT, FOLD_V_SCALE)
        else:
            m_new = tl.maximum(m_i, reduce_max(s, axis=1))
            # Rows with nothing attended yet keep m = -inf; shift them by 0 to avoid -inf - -inf.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - shift)
            p = tl.exp(s - shift[:, None])
            l_i = l_i * alpha + reduce_sum(p, axis=1)
            p_v = p  # the weights of the PV product; packed formats may fold their value scales in below
            if KV_FORMAT == KV_ALIGNED:
                # A skipped block kept the high-part scores, so its e_blk, c_blk are in this frame.
                e_i = e_i * alpha + e_blk
                c_i = c_i * alpha + c_blk
                w_i = w_i * alpha + reduce_sum(p * amp[None, :], axis=1)
            elif KV_FORMAT == KV_SCALED_ROWS:
                # The value scale folds into the weights: acc += (p * scale_v) @ c_v, one rounding of
                # p * scale_v to the dtype in place of the rounding of p.
                if VALUE_BLOCK:
                    v = load_code_blocks(v_base, n0, end, d, d_ok, stride_vn, code_dtype, UPCAST_DOT, BLOCK_N,
                                          BLOCK_D, VALUE_BLOCK)
                else:
                    v = load_codes(v_base, n, kv_ok, d, d_ok, stride_vn, code_dtype, UPCAST_DOT)
                v_scale = tl.load(VS + bh64 * rows_cap + n, mask=kv_ok, other=0.0)
                if FOLD_V_SCALE:
                    p_v = p * v_scale[None, :]
                else:
                    # fp16: p * scale_v would be subnormal (2^-25 absolute, times |c| <= 127 instead of |v|)
                    # wherever it is below 2^-14, e.g. p < 2.5e-3 at scale 3 / 127: dequantize the tile instead.
                    v = (v.to(tl.float32) * v_scale[:, None]).to(dtype)
            else:
                v = tl.load(v_base + n[:, None] * stride_vn + d[None, :], mask=kv_ok[:, None] & d_ok[None, :],
                            other=0.0)
            if F16_CODES:
                p_f16, p_unscale = f16_rows(p_v)
                acc = acc * alpha[:, None] + mma(p_f16, v, DOT_PRECISION, UPCAST_DOT) * p_unscale[:, None]
            else:
                acc = acc * alpha[:, None] + mma(p_v.to(dtype), v, DOT_PRECISION, UPCAST_DOT)
            m_i = m_new

    if KV_FORMAT == KV_ALIGNED:
        tl.atomic_add(Stats, low_tokens.to(tl.int64))
        tl.atomic_add(Stats + 1, read_tokens.to(tl.int64))
    norm = tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_rows = (bh * num_rows + rows).to(tl.int64)  # == (b * Hq + head) * Lq + i, the row of Out
    if SPLIT_OUTPUT:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i))
        num_splits = tl.num_programs(1)
        total_rows = (tl.num_programs(0) // row_blocks) * num_rows
        o_off, lse_off = part_offsets(out_rows, split, num_splits, total_rows, HEAD_DIM)
        tl.store(Part + lse_off, lse, mask=row_ok)
        out_ptrs = Part + o_off
    else:
        out_ptrs = Out + out_rows * HEAD_DIM
    if KV_FORMAT == KV_INT4:
        if FOLD_V_SCALE:
            acc = acc + min_i[:, None]
            acc_hi = acc_hi + min_i[:, None]
        _store_rows(out_ptrs, acc / norm, row_ok, h, h < HALF, SPLIT_OUTPUT)
        _store_rows(out_ptrs + HALF, acc_hi / norm, row_ok, h, HALF + h < HEAD_DIM, SPLIT_OUTPUT)
    else:
        o = acc / norm
        if ROTATE_STAGES and not SPLIT_OUTPUT:  # turned back in fp32, before the one rounding to the dtype
            o = rotate(o, BLOCK_M, BLOCK_D, ROTATE_STAGES, ROTATE_SHIFT)
        _store_rows(out_ptrs, o, row_ok, d, d_ok, SPLIT_OUTPUT)


@triton.jit
def _store_rows(row_ptrs, o, row_ok, cols, col_ok, SPLIT_OUTPUT: tl.constexpr):
    """o [BLOCK_M, C] to columns ``cols`` of rows ``row_ptrs``: fp32 partials, or the output's dtype."""
    ptrs = row_ptrs[:, None] + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT_OUTPUT:
        tl.store(ptrs, o, mask=mask)
    else:
        tl.store(ptrs, o.to(ptrs.dtype.element_ty), mask=mask)
