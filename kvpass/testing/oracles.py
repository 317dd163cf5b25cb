"""Float64 references: plain attention and the oracle of each kvpass variant.

Everything here computes in float64 on the inputs' device, from the inputs exactly as the kernel
receives them (already rounded to their dtype), so the only difference left between a correct
kernel and the reference is the kernel's own arithmetic, which ``tolerance`` bounds.

Semantics follow torch's ``scaled_dot_product_attention``: bool masks attend where True,
additive masks are added to the scaled scores, ``is_causal`` is top-left aligned (query i sees
keys j <= i), query head h reads KV head h // (Hq // Hkv), and a query row with no attended key
gives 0 (torch's math SDPA since 2.5).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from kvpass.testing.problems import AttentionProblem

F64 = torch.float64


def _unpack(problem_or_q, k, v, attn_mask, is_causal, scale):
    if isinstance(problem_or_q, AttentionProblem):
        p = problem_or_q
        return p.q, p.k, p.v, p.attn_mask, p.is_causal, p.scale
    if k is None or v is None:
        raise TypeError("reference_attention(q, k, v, ...) needs k and v when q is a tensor")
    return problem_or_q, k, v, attn_mask, is_causal, scale


def logit_bias(attn_mask, is_causal: bool, q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """What the mask and causality add to the scaled scores: float64 0 / bias / -inf.

    Broadcastable to [B, Hq, Lq, L] (the mask's own leading dims, [1, 1, Lq, L] without a mask).
    """
    if attn_mask is None:
        bias = torch.zeros(1, 1, q_len, kv_len, dtype=F64, device=device)
    elif attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=F64, device=attn_mask.device).masked_fill(~attn_mask, -math.inf)
    else:
        bias = attn_mask.to(F64)
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    if is_causal:
        rows = torch.arange(q_len, device=bias.device)[:, None]
        cols = torch.arange(kv_len, device=bias.device)[None, :]
        bias = bias.masked_fill(cols > rows, -math.inf)
    return bias


def grouped_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` [B, Hq, M, X] @ ``b`` [B, Hkv, X, N] with query head h using KV head h // (Hq // Hkv)."""
    B, Hq, M, X = a.shape
    Hkv, N = b.shape[1], b.shape[-1]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} are not a multiple of KV heads {Hkv}")
    out = a.reshape(B, Hkv, Hq // Hkv * M, X) @ b
    return out.reshape(B, Hq, M, N)


def reference_scores(q, k, attn_mask=None, is_causal=False, scale=None) -> torch.Tensor:
    """Scaled scores plus mask, float64 [B, Hq, Lq, L]; -inf where a key is not attended."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = grouped_matmul(q.to(F64), k.to(F64).transpose(-1, -2)) * scale
    return s + logit_bias(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device)


def safe_softmax(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; a row that is all -inf gives zeros, not NaN."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)


def reference_probs(problem_or_q, k=None, attn_mask=None, is_causal=False, scale=None):
    """(scores, probabilities), both float64 [B, Hq, Lq, L]."""
    if isinstance(problem_or_q, AttentionProblem):
        p = problem_or_q
        problem_or_q, k, attn_mask, is_causal, scale = p.q, p.k, p.attn_mask, p.is_causal, p.scale
    s = reference_scores(problem_or_q, k, attn_mask, is_causal, scale)
    return s, safe_softmax(s)


def reference_attention(problem_or_q, k=None, v=None, attn_mask=None, is_causal=False,
                        scale=None) -> torch.Tensor:
    """Float64 attention [B, Hq, Lq, D] of a problem, or of SDPA-style arguments."""
    q, k, v, attn_mask, is_causal, scale = _unpack(problem_or_q, k, v, attn_mask, is_causal, scale)
    _, probs = reference_probs(q, k, attn_mask, is_causal, scale)
    return grouped_matmul(probs, v.to(F64))


def kept_set_attention(problem: AttentionProblem, kept_index: torch.Tensor) -> torch.Tensor:
    """Attention over the kept tokens only (compressed caches), float64 [B, Hq, Lq, D].

    ``kept_index``: long [K] (the same tokens for every head) or [B, Hkv, K] (per KV head), indices
    into the cache's L positions. The mask and causality apply at the tokens' original positions.
    """
    p = problem
    B, Hkv, L, D = p.k.shape
    idx = kept_index.to(device=p.k.device, dtype=torch.long)
    if idx.dim() == 1:
        idx = idx.expand(B, Hkv, idx.shape[0])
    if idx.shape[:2] != (B, Hkv):
        raise ValueError(f"kept_index must be [K] or [B={B}, Hkv={Hkv}, K], got {tuple(kept_index.shape)}")
    if idx.numel() and (idx.min() < 0 or idx.max() >= L):
        raise ValueError(f"kept_index out of range 0..{L - 1}")
    K = idx.shape[-1]
    gather_kv = lambda t: t.to(F64).gather(2, idx[..., None].expand(B, Hkv, K, D))  # noqa: E731
    bias = logit_bias(p.attn_mask, p.is_causal, p.q_len, L, p.q.device).expand(B, p.q_heads, p.q_len, L)
    idx_q = idx.repeat_interleave(p.group, dim=1)[:, :, None, :].expand(B, p.q_heads, p.q_len, K)
    return reference_attention(p.q, gather_kv(p.k), gather_kv(p.v), attn_mask=bias.gather(-1, idx_q),
                               scale=p.scale)


def quantized_attention(problem: AttentionProblem, quantize_k: Callable | None,
                        quantize_v: Callable | None) -> torch.Tensor:
    """Quantize-then-attend in float64 [B, Hq, Lq, D] (quantized caches).

    ``quantize_k``/``quantize_v`` are quantize-dequantize functions: they receive the cache tensor
    [B, Hkv, L, D] in the problem's dtype and return the values the kernel should see, same shape
    (None: not quantized). They run in whatever precision they choose; attention is float64.
    """
    p = problem
    k = p.k if quantize_k is None else quantize_k(p.k)
    v = p.v if quantize_v is None else quantize_v(p.v)
    for name, t, like in (("quantize_k", k, p.k), ("quantize_v", v, p.v)):
        if t.shape != like.shape:
            raise ValueError(f"{name} returned {tuple(t.shape)}, expected {tuple(like.shape)}")
    return reference_attention(p.q, k.to(F64), v.to(F64), attn_mask=p.attn_mask, is_causal=p.is_causal,
                               scale=p.scale)


def early_exit_bound_holds(out: torch.Tensor, ref: torch.Tensor, bound) -> bool:
    """True when ``out`` is finite and |out - ref| <= bound everywhere (early exit's stated bound).

    ``ref`` is full attention (``reference_attention``); ``bound`` a float or a tensor
    broadcastable to ``ref`` (e.g. the kernel's reported bound per row, [B, Hq, Lq, 1]).
    """
    out64 = out.to(device=ref.device, dtype=F64)
    if out64.shape != ref.shape or not torch.isfinite(out64).all():
        return False
    bound = torch.as_tensor(bound, dtype=F64, device=ref.device)
    return bool(((out64 - ref).abs() <= bound).all())  # NaN compares False
