"""Launcher of the slot-replacement decode kernel (``kernel.py``): SnapKV's, H2O's or streaming's decode step on
``budget`` slots."""
from __future__ import annotations

import math

import torch

from lowering.attention.grid import broadcast_strides, mask_bytes, next_power_of_2
from lowering.attention.slots.kernel import replace_kernel
from lowering.core.limits import MASKED_BELOW, masked_value
from lowering.core.operands import SlotRule

MAX_SECTIONS = 4
MAX_ROW_BYTES = 1024  # 256 fp32 elements: head dims up to 256 in 32-bit, 512 in 16-bit


def _row_bytes(t: torch.Tensor) -> int:
    return math.prod(t.shape[3:]) * t.element_size()


def _dense_rows(t: torch.Tensor) -> bool:
    """Each [..., slot, row] of t [B, H, N, ...] is contiguous and the slots follow one another."""
    expected = t.element_size()
    for size, stride in zip(reversed(t.shape[3:]), reversed(t.stride()[3:])):
        if size > 1 and stride * t.element_size() != expected:
            return False
        expected *= size
    return t.shape[2] == 1 or t.stride(2) * t.element_size() == expected


def unsupported_reason(slots: dict, rows: dict, pos: torch.Tensor, score: torch.Tensor,
                       mask: torch.Tensor) -> str | None:
    """None when ``replace_step`` takes this step: up to four row sections of contiguous slots, CUDA (or the
    CPU interpreter), metadata with contiguous slots, a 4-D mask."""
    if len(rows) > MAX_SECTIONS:
        return f"{len(rows)} sections (the kernel writes {MAX_SECTIONS})"
    if pos.stride(-1) != 1 or score.stride() != pos.stride() or mask.dim() != 4:
        return "metadata or mask layout"
    for name, dst in slots.items():
        src = rows[name]
        if tuple(dst.shape[:3]) != tuple(pos.shape) or tuple(src.shape[3:]) != tuple(dst.shape[3:]):
            return f"section {name}: not one row per slot"
        if not (_dense_rows(dst) and _dense_rows(src)) or _row_bytes(dst) > MAX_ROW_BYTES:
            return f"section {name}: rows not contiguous"
    return None


def replace_step(pos: torch.Tensor, score: torch.Tensor, position: torch.Tensor, mask: torch.Tensor,
                 slots: dict, rows: dict, q_heads: int, q_len: int, never: float, rule: SlotRule,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step on the slots by ``rule``, in place (``kernel.py``). pos int64 / score fp32 [B, Hkv, budget]
    (contiguous slots), position int64 [1] (the new token's, on the device), mask [B|1, Hq|1, Lq|1, capacity]
    (bool or additive), ``slots`` the row sections [B, Hkv, budget, ...] and ``rows`` the new token's
    [B, Hkv, 1, ...] by name; ``weights`` (``rule.accumulates``): fp32 [B, Hkv, budget + 1], the step's attention
    weight of each slot and of the new token; ``unsupported_reason`` must be None. Returns the mask over the slots
    after the step, [B, Hq, Lq, budget] in the mask's dtype (``fixed_budgeted.kept_mask``'s)."""
    batch, kv_heads, budget = pos.shape
    if rule.accumulates != (weights is not None):
        raise ValueError("weights are given exactly when the rule accumulates them")
    if weights is not None:
        weights = weights.float().contiguous()
    raw = mask_bytes(mask)
    kept = torch.empty((batch, q_heads, q_len, budget), dtype=mask.dtype, device=mask.device)
    masked = float(masked_value(mask.dtype))  # read for an additive mask only
    args, strides_d, strides_s, widths = [], [], [], []
    for name in list(slots)[:MAX_SECTIONS]:
        dst, src = slots[name], rows[name]
        size = dst.element_size()
        args += [dst.view(torch.uint8) if dst.dim() > 3 else dst.unsqueeze(-1).view(torch.uint8),
                 src.view(torch.uint8) if src.dim() > 3 else src.unsqueeze(-1).view(torch.uint8)]
        strides_d += [dst.stride(0) * size, dst.stride(1) * size]
        strides_s += [src.stride(0) * size, src.stride(1) * size]
        widths.append(_row_bytes(dst))
    while len(widths) < MAX_SECTIONS:  # unused sections: any tensor, never read (ROW 0)
        args += [pos, pos]
        strides_d += [0, 0]
        strides_s += [0, 0]
        widths.append(0)
    replace_kernel[(batch * kv_heads,)](
        pos, score, position, raw, mask_bytes(kept), score if weights is None else weights, *args,
        kv_heads, budget, rule.recent, rule.n_sink, q_heads // kv_heads, q_len, never,
        0.0 if rule.sink is None else rule.sink, MASKED_BELOW, masked,
        pos.stride(0), pos.stride(1), *broadcast_strides(raw), kept.stride(0), kept.stride(1), kept.stride(2),
        *strides_d, *strides_s,
        ROW0=widths[0], ROW1=widths[1], ROW2=widths[2], ROW3=widths[3],
        BLOCK_R=max(16, next_power_of_2(max(widths))),
        BLOCK_K=max(16, next_power_of_2(budget)),
        BLOCK_Q=max(16, next_power_of_2(q_heads // kv_heads * q_len)),
        MASK_BOOL=mask.dtype == torch.bool, STREAMING=rule.sink is not None, ADD_WEIGHTS=rule.accumulates,
        num_warps=4 if budget >= 1024 else 1,
    )
    return kept
