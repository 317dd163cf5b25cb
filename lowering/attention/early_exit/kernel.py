"""Decode attention with early termination (ART-style, with a proven bound): device code only.

One program per (batch, KV head): it loads the query rows of every query head sharing the KV head
(GQA/MQA read each K/V block once for the group), then visits the cache's summary blocks in the
order the launcher planned (``lowering/attention/early_exit/bound.py``: the recent window, then the highest key
bound first), keeping the online-softmax state (m, l, acc) in fp32 per row. Before each block it
tests, for every row, the stop criterion proven in ``lowering/attention/early_exit/bound.py``::

    r * (vmax_rest + ||acc / l||) * SAFETY <= tol * ||acc / l||,   r = w / (e^m l + w)

where ``w = exp(LogRest[k])`` bounds the total weight exp(s_j) of the keys in the blocks not yet
read (Quest-style key bounds times token counts) and ``vmax_rest`` the largest value norm among
them; the program stops once every row of the group passes (a block is skipped only when it can
change no query head's output by more than the tolerance). ``EARLY_EXIT=False`` is the same kernel
reading every block in cache order with a pipelined loop: the baseline the benchmark compares with.

The body of a block (scores, mask, online softmax, PV) follows ``decode_attention_split_kernel``
and reuses its helpers; no split-KV here (the stop decision needs a program's whole state), so the
grid is B * Hkv programs: early exit pays at large batch, where the grid fills the GPU anyway.
"""

import triton
import triton.language as tl

from lowering.attention.device.reductions import mma, reduce_max, reduce_sum
from lowering.core import operands

MASK_NONE = tl.constexpr(operands.MASK_NONE)
MASK_BOOL = tl.constexpr(operands.MASK_BOOL)
MASK_ADDITIVE = tl.constexpr(operands.MASK_ADDITIVE)


@triton.jit
def _attend_block(q, m_i, l_i, acc, k_base, v_base, m_rows, n0, kv_len, stride_kn, stride_vn, stride_mn, sm_scale,
                  d, d_ok, row_ok, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  UPCAST_DOT: tl.constexpr):
    """One block of keys [n0, n0 + BLOCK_N) folded into the online-softmax state of every row."""
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < kv_len
    keep = row_ok[:, None] & n_ok[None, :]
    if MASK_KIND != MASK_NONE:
        mval = tl.load(m_rows[:, None] + n[None, :] * stride_mn, mask=keep, other=0)
        if MASK_KIND == MASK_BOOL:
            keep = keep & (mval != 0)
        else:
            bias = mval.to(tl.float32)
            keep = keep & (bias != float("-inf"))
    k = tl.load(k_base + n[:, None] * stride_kn + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * sm_scale
    if MASK_KIND == MASK_ADDITIVE:
        s = s + bias
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, reduce_max(s, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing attended yet
    alpha = tl.exp(m_i - shift)
    p = tl.exp(s - shift[:, None])
    l_i = l_i * alpha + reduce_sum(p, axis=1)
    v = tl.load(v_base + n[:, None] * stride_vn + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
    return m_new, l_i, acc


@triton.jit
def _all_converged(m_i, l_i, acc, rest_rows, vrest_ptr, k, row_ok, tol, SAFETY: tl.constexpr):
    """1 when every valid row passes the stop criterion after ``k`` blocks, else 0 (a scalar)."""
    log_w = tl.load(rest_rows + k, mask=row_ok, other=float("-inf"))  # log of the unread weight bound
    v_rest = tl.load(vrest_ptr + k)
    norm = tl.sqrt(reduce_sum(acc * acc, axis=1)) / tl.where(l_i == 0.0, 1.0, l_i)
    log_z = m_i + tl.log(l_i)  # log of the read weight; -inf before any attended key
    r = 1.0 / (1.0 + tl.exp(log_z - log_w))  # w / (z + w)
    r = tl.where(log_w == float("-inf"), 0.0, r)  # nothing left to read (also -inf - -inf)
    ok = (r * (v_rest + norm) * SAFETY <= tol * norm) | (row_ok == 0)
    return tl.reduce(ok.to(tl.int32), 0, _min_combine)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit(do_not_specialize=["kv_len", "num_blocks", "tol"])
def early_exit_attention_kernel(
    Q, K, V, Mask,  #
    Out,  # [B, Hq, Lq, D] contiguous
    Order,  # int32 [B * Hkv, num_blocks]: the blocks in visiting order
    LogRest,  # fp32 [B * Hkv * GROUP * Lq, num_blocks + 1]: log bound of the unread weight after k visits
    VRest,  # fp32 [B * Hkv, num_blocks + 1]: largest value norm of the unread blocks after k visits
    Count,  # int32 [B * Hkv]: blocks read (written)
    stride_qb, stride_qh, stride_qm,  # q [B, Hq, Lq, D], last dim contiguous
    stride_kb, stride_kh, stride_kn,  # k [B, Hkv, L, D]
    stride_vb, stride_vh, stride_vn,  # v [B, Hkv, L, D]
    stride_mb, stride_mh, stride_mm, stride_mn,  # mask viewed as [B, Hq, Lq, L], 0 on broadcast dims
    num_kv_heads, q_len, kv_len, num_blocks, sm_scale, tol,  #
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # GROUP * Lq rows, padded to a power of two >= 16
    BLOCK_N: tl.constexpr,  # keys per block: the summaries' block size
    BLOCK_D: tl.constexpr,
    MASK_KIND: tl.constexpr,
    EARLY_EXIT: tl.constexpr,  # False: read every block in cache order (the baseline)
    SAFETY: tl.constexpr,  # > 1: covers the fp32 rounding of the criterion's terms (see early_exit.py)
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs at least 16 rows")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs at least 16 keys")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D pads HEAD_DIM")

    num_rows = GROUP * q_len
    bh = tl.program_id(0)  # b * Hkv + kv_head
    b = (bh // num_kv_heads).to(tl.int64)
    kv_head = (bh % num_kv_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    g = rows // q_len
    i = rows - g * q_len
    head = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + i[:, None] * stride_qm + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    m_rows = Mask + b * stride_mb + head * stride_mh + i * stride_mm  # [BLOCK_M] row pointers (unused: no mask)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

    if EARLY_EXIT:
        out_rows64 = (bh * num_rows + rows).to(tl.int64)
        rest_rows = LogRest + out_rows64 * (num_blocks + 1)
        vrest_ptr = VRest + bh.to(tl.int64) * (num_blocks + 1)
        order_ptr = Order + bh.to(tl.int64) * num_blocks
        k = tl.full([], 0, dtype=tl.int32)
        done = _all_converged(m_i, l_i, acc, rest_rows, vrest_ptr, k, row_ok, tol, SAFETY)
        while (k < num_blocks) & (done == 0):
            blk = tl.load(order_ptr + k)
            m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_base, v_base, m_rows, blk * BLOCK_N, kv_len,
                                          stride_kn, stride_vn, stride_mn, sm_scale, d, d_ok, row_ok,
                                          BLOCK_N, MASK_KIND, DOT_PRECISION, UPCAST_DOT)
            k += 1
            done = _all_converged(m_i, l_i, acc, rest_rows, vrest_ptr, k, row_ok, tol, SAFETY)
        tl.store(Count + bh, k)
    else:
        for n0 in range(0, kv_len, BLOCK_N):
            m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_base, v_base, m_rows, n0, kv_len,
                                          stride_kn, stride_vn, stride_mn, sm_scale, d, d_ok, row_ok,
                                          BLOCK_N, MASK_KIND, DOT_PRECISION, UPCAST_DOT)
        tl.store(Count + bh, num_blocks)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_rows = (bh * num_rows + rows).to(tl.int64)  # == (b * Hq + head) * Lq + i
    tl.store(Out + out_rows[:, None] * HEAD_DIM + d[None, :], o.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
