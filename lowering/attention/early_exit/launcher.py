"""Launcher of the early-exit decode kernel (``lowering/attention/early_exit/kernel.py``): validates the
inputs and launches one program per (batch, KV head) over the visiting plan of ``bound.plan_visits``."""
from __future__ import annotations

import torch

from lowering.attention.decode.launcher import decode_attention_unsupported_reason
from lowering.attention.early_exit import bound, kernel
from lowering.attention.early_exit.bound import VisitPlan
from lowering.attention.grid import last_dim_contiguous, mask_bytes, next_power_of_2
from lowering.core.operands import MASK_ADDITIVE, MASK_BOOL, MASK_NONE


def unsupported_reason(q, k, v, attn_mask) -> str | None:
    """None when ``bounded_attention_triton`` takes these inputs, else why not."""
    reason = decode_attention_unsupported_reason(q, k, v, attn_mask, False)
    if reason is None and (q.shape[1] // k.shape[1]) * q.shape[2] > MAX_ROWS:
        reason = f"{q.shape[1] // k.shape[1]} query heads per KV head x {q.shape[2]} positions > {MAX_ROWS} rows"
    return reason


MAX_ROWS = 128  # query rows per program (GQA 8 x 16 speculative tokens); one program per KV head


def bounded_attention_triton(q, k, v, plan: VisitPlan | None, attn_mask, scale: float, tol: float, *,
                             out=None, early_exit: bool = True, num_warps: int = 4, num_stages: int = 2):
    """The Triton kernel: -> (out [B, Hq, Lq, D] in q's dtype, blocks_read [B, Hkv] int32).

    ``early_exit=False`` reads every block in cache order (``plan`` may be None): the baseline.
    q [B, Hq, Lq, D], k, v [B, Hkv, L, D] (same dtype, fp32/fp16/bf16), ``attn_mask`` None, bool or
    additive broadcastable to [B, Hq, Lq, L]. No host-device synchronisation."""
    reason = unsupported_reason(q, k, v, attn_mask)
    if reason is not None:
        raise ValueError(f"bounded_attention_triton: {reason}")
    B, Hq, Lq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G, nb = Hq // Hkv, bound.num_blocks(L)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype) if out is None else out
    count = torch.empty(B, Hkv, device=q.device, dtype=torch.int32)
    if out.numel() == 0 or L == 0:
        return out.zero_(), count.zero_()
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    mask_kind, mask, mask_strides = MASK_NONE, q, (0, 0, 0, 0)
    if attn_mask is not None:
        mask = attn_mask.expand(B, Hq, Lq, L)
        mask_strides = mask.stride()
        mask_kind = MASK_BOOL if mask.dtype == torch.bool else MASK_ADDITIVE
        mask = mask_bytes(mask)
    if early_exit:
        order, log_rest, v_rest = plan.order, plan.log_rest, plan.v_rest
    else:
        order = log_rest = v_rest = count  # not read
    qs, ks, vs = q.stride(), k.stride(), v.stride()
    kernel.early_exit_attention_kernel[(B * Hkv,)](
        q, k, v, mask, out, order, log_rest, v_rest, count,
        qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], *mask_strides,
        Hkv, Lq, L, nb, float(scale), float(tol),
        GROUP=G, HEAD_DIM=D, BLOCK_M=max(16, next_power_of_2(G * Lq)), BLOCK_N=bound.BLOCK,
        BLOCK_D=max(16, next_power_of_2(D)), MASK_KIND=mask_kind, EARLY_EXIT=early_exit, SAFETY=bound.SAFETY,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_DOT=q.device.type == "cpu" and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, count
