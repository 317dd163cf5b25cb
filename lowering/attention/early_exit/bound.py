"""Early termination of decode attention with a proven bound (ART, arXiv 2606.00024, made exact).

ART stops reading KV blocks once the running output looks stable (a heuristic, not offered: see
``bench/art_criterion.py``). kvpass stops only
when what is left *cannot* move the output by more than ``tol``: every cache block of ``BLOCK`` keys
and KV head keeps a summary (Quest, Tang et al. 2024: elementwise key min and max; plus the largest
value L2 norm), enough to bound the softmax weight and the contribution of any block not yet read.

Summaries (sections of the packed cache, ``summary_layout``): ``ee_kmin``, ``ee_kmax`` [B, Hkv, nb, Dk]
in the cache's dtype (elements of the keys themselves, so exact) and ``ee_vmax`` [B, Hkv, nb] fp32,
nb = ceil(L / BLOCK); ``update_summaries`` merges the new tokens into the last partial block on append.

The bound (one query row; scores s_j = scale q.k_j + b_j with b_j the mask's bias, -inf if hidden).
Let R be the keys read, U the rest, Z_X = sum_{j in X} e^{s_j}, o_X = sum_{j in X} e^{s_j} v_j / Z_X.

1. In block c every key has k_jd in [kmin_cd, kmax_cd], so q_d k_jd <= max(q_d kmin_cd, q_d kmax_cd)
   and s_j <= B_c = scale sum_d max(q_d kmin_cd, q_d kmax_cd) + max_{j in c} b_j. Hence
   Z_U <= W = sum_{c unread} n_c e^{B_c} (n_c: tokens of block c).
2. Full attention o = (Z_R o_R + Z_U o_U) / (Z_R + Z_U), so o - o_R = Z_U / (Z_R + Z_U) (o_U - o_R).
3. o_U is a convex combination of the unread values: ||o_U|| <= Vmax_U = max_{c unread} vmax_c,
   so ||o_U - o_R|| <= Vmax_U + ||o_R||.
4. x / (Z_R + x) increases with x, so Z_U / (Z_R + Z_U) <= r = W / (Z_R + W).

Therefore ``||o - o_R||_2 <= eps = r (Vmax_U + ||o_R||_2)`` (L2 norm of one query row's output).
The kernel stops when eps <= tol ||o_R||_2 for every query row of the KV head's group (all query
heads and query positions sharing the blocks), so each row's output satisfies
``||o - out||_2 <= tol ||out||_2`` (+ the rounding of an exact kernel), i.e. a relative L2 error per
query row of at most tol (tol / (1 - tol) relative to ||o||). With tol = 0 it stops only when W = 0:
every unread key is hidden by the mask, and the output is full attention.

Floating point (the proof above is exact arithmetic): (a) the computed B_c gets a margin
mu_c = (D + 8) u (scale sum_d |q_d| max(|kmin_cd|, |kmax_cd|) + |max b|) with u = 2^-24 (2^-11 when torch
may use tf32 matmuls): the fp32 dot product errs by at most D u times that sum (Higham, gamma_D), the
scale, the bias add and the max by 4 more roundings. (b) The kernel's own scores err by at most the
same mu, so the true Z_R >= e^{-mu*} times the kernel's (mu* the row's largest margin): mu* is added
to log W. (c) The rest (fp32 suffix sums, the (3L + 4) u relative error of the running sum l,
norms, exp/log) is covered by ``SAFETY``. ``vmax`` is rounded up by ``VNORM_ROUNDUP``.

Visiting order, per (batch, KV head): the ``RECENT_BLOCKS`` newest blocks first (the local window
holds much of decode attention's mass), then by decreasing bound relative to each row's best bound
(max over the group's rows), fully hidden blocks last (never read). The launcher computes bounds,
order and the suffix sums log W_k, Vmax_k (after k blocks read) in torch: reading the summaries is
2 D values per 64-key block, 1/64 of the K/V traffic. ``bounded_attention_reference`` runs the same
plan and criterion in torch (the CPU path); ``lowering.attention.early_exit.launcher.bounded_attention_triton``
runs ``lowering/attention/early_exit/kernel.py``.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from lowering.attention import launchers
from lowering.core.packed import Layout

BLOCK = 64  # keys per summary block: the kernel's key tile (64 is the decode kernel's B>=8 tile on an H100)
RECENT_BLOCKS = 1  # visited first: the block holding the newest tokens
# Relative slack on the criterion for fp32 rounding of its terms: (3L + 4) 2^-24 for the running sum
# stays under 2^-6 up to L = 87k keys; suffix sums (nb 2^-24) and norms (D 2^-24) are far smaller.
SAFETY = 1.0 + 2.0 ** -6
VNORM_ROUNDUP = 1.0 + 2.0 ** -12  # fp32 L2 norms err by (D/2 + 2) 2^-24 relative: < 2^-12 for D <= 4000
SECTIONS = ("ee_kmin", "ee_kmax", "ee_vmax")


def num_blocks(length):
    return (length + BLOCK - 1) // BLOCK  # works on symbolic lengths too


def summary_layout(batch, kv_heads, length, k_dim, dtype) -> Layout:
    nb = num_blocks(length)
    return {"ee_kmin": ((batch, kv_heads, nb, k_dim), dtype), "ee_kmax": ((batch, kv_heads, nb, k_dim), dtype),
            "ee_vmax": ((batch, kv_heads, nb), torch.float32)}


def update_summaries(old: dict | None, old_length: int, new_k: torch.Tensor, new_v: torch.Tensor,
                     out: dict) -> None:
    """Write the summaries of ``old_length`` + n tokens into ``out`` (sections of ``summary_layout``).

    ``old``: the summaries of the first ``old_length`` tokens (None when 0); new_k [B, Hkv, n, Dk] and
    new_v [B, Hkv, n, Dv]: the new tokens as attention will see them (dequantized for a quantized
    scheme). Full old blocks are copied; the new tokens' blocks are reduced, and the old partial last
    block, if any, merged in (min / max are associative): O(n) work per append, not O(L).
    """
    B, H, n, _ = new_k.shape
    first, offset = divmod(old_length, BLOCK)
    nb = num_blocks(old_length + n)
    if old is not None and first:
        for name in SECTIONS:
            out[name][:, :, :first].copy_(old[name][:, :, :first])
    span = (nb - first) * BLOCK
    dtype = out["ee_kmin"].dtype

    def blocks(x, fill):  # x [B, H, n, ...] -> [B, H, nb - first, BLOCK, ...], padded with fill
        padded = x.new_full((B, H, span, *x.shape[3:]), fill)
        padded[:, :, offset:offset + n] = x
        return padded.view(B, H, nb - first, BLOCK, *x.shape[3:])

    k = new_k.to(dtype)
    kmin, kmax = blocks(k, math.inf).amin(3), blocks(k, -math.inf).amax(3)
    vmax = blocks(new_v.float().norm(dim=-1) * VNORM_ROUNDUP, 0.0).amax(3)
    if old is not None and offset:  # the old partial block goes on with the new tokens
        kmin[:, :, 0] = torch.minimum(kmin[:, :, 0], old["ee_kmin"][:, :, first])
        kmax[:, :, 0] = torch.maximum(kmax[:, :, 0], old["ee_kmax"][:, :, first])
        vmax[:, :, 0] = torch.maximum(vmax[:, :, 0], old["ee_vmax"][:, :, first])
    out["ee_kmin"][:, :, first:].copy_(kmin)
    out["ee_kmax"][:, :, first:].copy_(kmax)
    out["ee_vmax"][:, :, first:].copy_(vmax)


def build_summaries(k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summaries of a whole cache k [B, Hkv, L, Dk], v [B, Hkv, L, Dv] (tests, benchmarks)."""
    B, H, L, D = k.shape
    out = {name: torch.empty(shape, dtype=dt, device=k.device)
           for name, (shape, dt) in summary_layout(B, H, L, D, k.dtype).items()}
    update_summaries(None, 0, k, v, out)
    return out


@dataclasses.dataclass
class VisitPlan:
    """What the kernel needs besides q, K, V: order [B, Hkv, nb] int32 (blocks in visiting order);
    log_rest [B, Hkv, G * Lq, nb + 1] fp32 (log W after k blocks read, per query row; row g * Lq + i
    is query head kv_head * G + g, position i); v_rest [B, Hkv, nb + 1] fp32 (Vmax of the unread)."""

    order: torch.Tensor
    log_rest: torch.Tensor
    v_rest: torch.Tensor

    @property
    def blocks_total(self) -> int:
        return self.order.numel()


def _block_bias(attn_mask, q_shape, length: int, device) -> torch.Tensor:
    """Largest bias of each block, fp32, broadcastable to [B, Hq, Lq, nb] (-inf: all hidden)."""
    nb = num_blocks(length)
    if attn_mask is None:
        return torch.zeros(1, 1, 1, nb, device=device)
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    bias = torch.where(m, 0.0, -math.inf) if m.dtype == torch.bool else m.float()
    bias = bias.expand(*bias.shape[:-1], length)  # a [.., 1] mask over every key
    pad = nb * BLOCK - length
    bias = torch.nn.functional.pad(bias, (0, pad), value=-math.inf)
    return bias.view(*bias.shape[:-1], nb, BLOCK).amax(-1)


def _score_unit_roundoff(device) -> float:
    tf32 = device.type == "cuda" and torch.get_float32_matmul_precision() != "highest"
    return 2.0 ** -11 if tf32 else 2.0 ** -24


def plan_visits(q: torch.Tensor, summaries: dict, length: int, attn_mask, scale: float, written=None) -> VisitPlan:
    """Bounds, visiting order and suffix sums for q [B, Hq, Lq, Dk] over ``length`` summarised tokens.

    ``written`` (int64 device scalar, or None for ``length``): the tokens held when the summaries span a fixed
    capacity of ``length``; the newest block is the one holding token ``written - 1`` and a block's token count
    stops at ``written`` (blocks past it count none: their keys must be hidden, ``fixed_early_exit`` hides them)."""
    B, Hq, Lq, D = q.shape
    kmin, kmax, vmax = (summaries[n] for n in SECTIONS)
    Hkv, nb = kmin.shape[1], kmin.shape[2]
    G = Hq // Hkv
    qs = (q.float() * scale).reshape(B, Hkv, G * Lq, D)
    kmin32, kmax32 = kmin.float(), kmax.float()
    bound = qs.clamp_min(0) @ kmax32.transpose(-1, -2) + qs.clamp_max(0) @ kmin32.transpose(-1, -2)
    magnitude = qs.abs() @ torch.maximum(kmin32.abs(), kmax32.abs()).transpose(-1, -2)  # [B, Hkv, R, nb]
    bias = _block_bias(attn_mask, q.shape, length, q.device).expand(B, Hq, Lq, nb).reshape(B, Hkv, G * Lq, nb)
    finite = torch.isfinite(bias)
    margin = (D + 8) * _score_unit_roundoff(q.device) * (magnitude + torch.where(finite, bias.abs(), 0.0))
    bound = torch.where(finite, bound + bias + margin, -math.inf)
    margin_max = torch.where(finite, margin, 0.0).amax(-1, keepdim=True)  # mu* per row

    row_best = bound.amax(-1, keepdim=True)
    relative = bound - torch.where(torch.isfinite(row_best), row_best, 0.0)
    priority = relative.amax(2)  # [B, Hkv, nb]: the best any row of the group could get from the block
    block = torch.arange(nb, device=q.device)  # built on the device: no host copy, CUDA-graph capturable
    filled = length if written is None else written
    newest = (filled - 1) // BLOCK
    recent = (block > newest - RECENT_BLOCKS) & (block <= newest)
    priority = torch.where(recent & torch.isfinite(priority), math.inf, priority)
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices  # [B, Hkv, nb]

    tokens = (filled - block * BLOCK).clamp(0, BLOCK).float()  # tokens per block
    weight = (bound + tokens.log()).gather(-1, order[:, :, None, :].expand(B, Hkv, G * Lq, nb))
    log_rest = torch.logcumsumexp(weight.flip(-1), -1).flip(-1) + margin_max
    log_rest = torch.cat([log_rest, log_rest.new_full((B, Hkv, G * Lq, 1), -math.inf)], -1)
    v_rest = vmax.gather(-1, order).flip(-1).cummax(-1).values.flip(-1)
    v_rest = torch.cat([v_rest, v_rest.new_zeros(B, Hkv, 1)], -1)
    return VisitPlan(order.to(torch.int32).contiguous(), log_rest.contiguous(), v_rest.contiguous())


def read_mask(plan: VisitPlan, blocks_read: torch.Tensor) -> torch.Tensor:
    """bool [B, Hkv, nb]: the blocks a run read (the first ``blocks_read`` [B, Hkv] of the order)."""
    nb = plan.order.shape[-1]
    visited = torch.arange(nb, device=plan.order.device) < blocks_read[..., None]
    return torch.zeros_like(visited).scatter(-1, plan.order.long(), visited)


def bounded_attention_reference(q, k, v, plan: VisitPlan, attn_mask, scale: float, tol: float):
    """The kernel's algorithm in torch (fp32): -> (out [B, Hq, Lq, Dv] in q's dtype, blocks_read [B, Hkv]).

    For every prefix of the visiting order it forms the read set's softmax state and the criterion,
    and takes the first prefix where every row of the group passes: the kernel's decision, computed
    without a loop (all scores are computed: on the CPU this path saves no work, it defines it).
    """
    B, Hq, Lq, D = q.shape
    Hkv, L, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, nb = Hq // Hkv, plan.order.shape[-1]
    R = G * Lq
    qs = (q.float() * scale).reshape(B, Hkv, R, D)
    s = qs @ k.float().transpose(-1, -2)
    if attn_mask is not None:
        m = attn_mask if attn_mask.dim() == 4 else attn_mask.view((1,) * (4 - attn_mask.dim()) + attn_mask.shape)
        bias = torch.where(m, 0.0, -math.inf) if m.dtype == torch.bool else m.float()
        s = s + bias.expand(B, Hq, Lq, L).reshape(B, Hkv, R, L)
    pad = nb * BLOCK - L
    s = torch.nn.functional.pad(s, (0, pad), value=-math.inf).view(B, Hkv, R, nb, BLOCK)
    top = s.amax((-1, -2), keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    e = torch.exp(s - top)  # [B, Hkv, R, nb, BLOCK]
    vb = torch.nn.functional.pad(v.float(), (0, 0, 0, pad)).view(B, Hkv, nb, BLOCK, Dv)
    order = plan.order.long()
    l_blk = e.sum(-1).gather(-1, order[:, :, None].expand(B, Hkv, R, nb))
    acc_blk = torch.einsum("bhrnk,bhnkd->bhrnd", e, vb)
    acc_blk = acc_blk.gather(3, order[:, :, None, :, None].expand(B, Hkv, R, nb, Dv))
    l_pre = torch.cat([l_blk.new_zeros(B, Hkv, R, 1), l_blk.cumsum(-1)], -1)  # after k blocks, k = 0..nb
    acc_pre = torch.cat([acc_blk.new_zeros(B, Hkv, R, 1, Dv), acc_blk.cumsum(3)], 3)
    out_pre = acc_pre / torch.where(l_pre == 0, 1.0, l_pre)[..., None]
    norm = out_pre.norm(dim=-1)
    log_z = top[..., 0] + l_pre.log()
    r = torch.where(plan.log_rest == -math.inf, 0.0, torch.sigmoid(plan.log_rest - log_z))
    ok = r * (plan.v_rest[:, :, None] + norm) * SAFETY <= tol * norm
    blocks_read = ok.all(2).int().argmax(-1)  # first k where every row passes (k = nb always does)
    out = out_pre.gather(3, blocks_read[:, :, None, None, None].expand(B, Hkv, R, 1, Dv))
    return out.reshape(B, Hq, Lq, Dv).to(q.dtype), blocks_read.int()


def bounded_attention(q, k, v, summaries: dict, attn_mask, scale: float | None, tol: float, written=None):
    """Decode attention of q [B, Hq, Lq, D] over k, v [B, Hkv, L, D] that stops once the unread blocks
    cannot change any row's output by more than ``tol`` (relative L2, see the module docstring).
    ``written``: as ``plan_visits``'s, for a fixed capacity L.
    -> (out, blocks_read [B, Hkv], blocks_total). The Triton kernel on CUDA, the reference elsewhere."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    plan = plan_visits(q, summaries, k.shape[2], attn_mask, scale, written)
    if q.is_cuda and launchers.load().early_exit.unsupported_reason(q, k, v, attn_mask) is None:
        out, read = launchers.load().early_exit.bounded_attention_triton(q, k, v, plan, attn_mask, scale, tol)
    else:
        out, read = bounded_attention_reference(q, k, v, plan, attn_mask, scale, tol)
    return out, read, plan.blocks_total
