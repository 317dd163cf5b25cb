"""One decode step of SnapKV (and ASL, whose decode rule is SnapKV's), H2O or streaming on a fixed-capacity cache's
``budget`` slots, in one program per (batch row, KV head): device code only.

The rule is ``lowering.formats.fixed_budgeted.replace_one``'s, decided from the slots' metadata (``snapkv.py``,
``h2o.py``, ``streaming.py`` in ``lowering/formats``) and, for H2O, this step's attention weights of every candidate,
which the caller computes (``ADD_WEIGHTS``):

- an old slot is visible when it holds a token (pos >= 0) and its stored score is above NEVER; its score
  becomes NEVER otherwise (``score.masked_fill(~visible, NEVER)``, written back for every slot);
- the new token (position p, the step's only one) is visible when some query row of some query head of the KV
  head may attend column p of the mask (bool: True; additive: >= MASKED_BELOW); its score is 0, or NEVER;
- SnapKV: selection keys +inf for the protected newest ``recent`` positions (pos >= p + 1 - recent; the new token
  is always one), the score otherwise; the new token's score 0;
- H2O: as SnapKV, with each old slot's score plus its weight (fp32, the torch path's one add) and the new token's
  score its weight;
- streaming (``STREAMING``): a visible old slot whose score is ``sink`` is a sink; the new token becomes one while
  fewer than ``n_sink`` are held; every other score (and key) is the position as fp32, a sink's ``sink``;
- keys are -inf for an invisible candidate;
- the dropped candidate: the first empty slot while there is one, else the smallest key, of equal ones the
  highest position (``slot_replacement.weakest``; the new token has the highest position of all);
- where an old slot is dropped, the new token's position, score and rows (up to four sections, each row
  ``ROW_BYTES_i`` contiguous bytes) go into it; where the new token is dropped, nothing is written but the scores;
- ``Kept`` [B, Hq, Lq, budget] gets the mask the attention over the slots takes (``fixed_budgeted.kept_mask``): the
  model's mask at each slot's position after the step, ``masked`` (False, or the additive mask's masked value)
  at an empty slot.

This is one launch where the torch path (``fixed_budgeted.choose_and_write``) launches several dozen small kernels
per layer and step (candidates, scores, keys, the reductions, four masked scatters), each a node of the decode
step's CUDA graph; the torch path stays for the other policies and inputs (``launcher.unsupported_reason``).
"""

import triton
import triton.language as tl


@triton.jit
def _copy_row(Dst, Src, slot, keep, ROW_BYTES: tl.constexpr, BLOCK_R: tl.constexpr):
    """Dst[slot] = Src (ROW_BYTES bytes) where ``keep``; Dst and Src already at this (batch row, KV head)."""
    if ROW_BYTES > 0:
        r = tl.arange(0, BLOCK_R)
        # keep broadcast by hand: the CPU interpreter's loads refuse a scalar bool and-ed into a mask
        ok = (r < ROW_BYTES) & (tl.zeros([BLOCK_R], tl.int32) + keep.to(tl.int32) > 0)
        tl.store(Dst + slot * ROW_BYTES + r, tl.load(Src + r, mask=ok, other=0), mask=ok)


@triton.jit
def replace_kernel(
    Pos, Score, Position, Mask, Kept,  #
    Weights,  # ADD_WEIGHTS: fp32 [B, Hkv, budget + 1] contiguous, the step's weight of each slot and the new token
    D0, S0, D1, S1, D2, S2, D3, S3,  # row sections: destination [B, Hkv, budget, row] and new rows [B, Hkv, row]
    kv_heads, budget, recent, n_sink, group, q_len, never, sink, masked_below, masked,  #
    stride_pb, stride_ph,  # pos and score [B, Hkv, budget], slots contiguous
    stride_mb, stride_mh, stride_mq, stride_mc,  # the mask [B|1, Hq|1, Lq|1, capacity] (0: broadcast)
    stride_kb, stride_kh, stride_kq,  # Kept [B, Hq, Lq, budget], slots contiguous
    stride_db0, stride_dh0, stride_db1, stride_dh1, stride_db2, stride_dh2, stride_db3, stride_dh3,  # bytes
    stride_sb0, stride_sh0, stride_sb1, stride_sh1, stride_sb2, stride_sh2, stride_sb3, stride_sh3,  # bytes
    ROW0: tl.constexpr, ROW1: tl.constexpr, ROW2: tl.constexpr, ROW3: tl.constexpr,  # row bytes, 0: unused
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    STREAMING: tl.constexpr = False,
    ADD_WEIGHTS: tl.constexpr = False,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // kv_heads
    h = pid % kv_heads
    k = tl.arange(0, BLOCK_K)
    ok = k < budget
    meta = b * stride_pb + h * stride_ph + k
    pos = tl.load(Pos + meta, mask=ok, other=-1)
    score = tl.load(Score + meta, mask=ok, other=never)
    p = tl.load(Position)
    # the new token's visibility: some row of some query head of this KV head may attend column p
    r = tl.arange(0, BLOCK_Q)
    rows_ok = r < group * q_len
    m_off = b * stride_mb + (h * group + r // q_len) * stride_mh + (r % q_len) * stride_mq + p * stride_mc
    if MASK_BOOL:
        seen = tl.load(Mask + m_off, mask=rows_ok, other=0) != 0
    else:
        seen = tl.load(Mask + m_off, mask=rows_ok, other=float("-inf")).to(tl.float32) >= masked_below
    vis_new = tl.max(seen.to(tl.int32), 0) > 0
    held = ok & (pos >= 0)
    vis_old = held & (score > never)
    inf = float("inf")
    if STREAMING:
        sink_old = vis_old & (score == sink)
        room = n_sink - tl.sum(sink_old.to(tl.int32), 0)
        old_score = tl.where(sink_old, sink, pos.to(tl.float32))
        new_score = tl.where(vis_new & (room >= 1), sink, p.to(tl.float32))
        key = tl.where(vis_old, old_score, -inf)
        key_new = tl.where(vis_new, new_score, -inf)
    else:
        if ADD_WEIGHTS:
            w_row = Weights + pid * (budget + 1)
            old_score = score + tl.load(w_row + k, mask=ok, other=0.0)
            new_score = tl.load(w_row + budget)
        else:
            old_score = score
            new_score = 0.0
        key = tl.where(vis_old, tl.where(pos >= p + 1 - recent, inf, old_score), -inf)
        key_new = tl.where(vis_new, inf, -inf)
    empty = ok & ~held
    first_empty = tl.min(tl.where(empty, k, BLOCK_K), 0)
    low = tl.minimum(tl.min(tl.where(ok, key, inf), 0), key_new)
    at_low = tl.where(ok & (key == low), pos, -1)
    highest = tl.max(at_low, 0)
    weakest_old = tl.min(tl.where(ok & (key == low) & (at_low == highest), k, BLOCK_K), 0)
    dropped = tl.where(first_empty < BLOCK_K, first_empty, tl.where(key_new == low, budget, weakest_old))
    keep = dropped < budget
    slot = tl.minimum(dropped, budget - 1).to(tl.int64)
    here = k == dropped  # nowhere where the new token is dropped
    tl.store(Score + meta, tl.where(here, tl.where(vis_new, new_score, never), tl.where(vis_old, old_score, never)),
             mask=ok)
    new_pos = tl.where(here, p, pos)
    tl.store(Pos + meta, new_pos, mask=ok)
    filled = ok & (new_pos >= 0)
    for j in range(0, group * q_len):  # the mask at the slots' positions, for every query head and row
        hq = h * group + j // q_len
        at = Mask + b * stride_mb + hq * stride_mh + (j % q_len) * stride_mq + tl.maximum(new_pos, 0) * stride_mc
        if MASK_BOOL:
            m = tl.load(at, mask=filled, other=0)
        else:
            m = tl.where(filled, tl.load(at, mask=filled, other=0.0), masked)
        tl.store(Kept + b * stride_kb + hq * stride_kh + (j % q_len) * stride_kq + k, m, mask=ok)
    _copy_row(D0 + b * stride_db0 + h * stride_dh0, S0 + b * stride_sb0 + h * stride_sh0, slot, keep, ROW0, BLOCK_R)
    _copy_row(D1 + b * stride_db1 + h * stride_dh1, S1 + b * stride_sb1 + h * stride_sh1, slot, keep, ROW1, BLOCK_R)
    _copy_row(D2 + b * stride_db2 + h * stride_dh2, S2 + b * stride_sb2 + h * stride_sh2, slot, keep, ROW2, BLOCK_R)
    _copy_row(D3 + b * stride_db3 + h * stride_dh3, S3 + b * stride_sb3 + h * stride_sh3, slot, keep, ROW3, BLOCK_R)
