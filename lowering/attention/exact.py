"""Exact attention: the split-KV decode kernel where it takes the inputs (CUDA, decode-length queries),
torch's SDPA elsewhere. Each call is counted in ``lowering.core.stats.calls`` by the lowering that served it."""
from __future__ import annotations

import logging

import torch

from lowering.attention import launchers
from lowering.attention.compile_failure import KernelCompileError
from lowering.core.limits import MAX_DECODE_QUERY_LEN
from lowering.core.reference import exact_attention
from lowering.core.stats import calls, set_last

log = logging.getLogger("kvpass.lowering")


def kernel_reason(q, k, v, attn_mask, is_causal) -> str | None:
    """None when the Triton decode kernel takes these inputs, else why not."""
    if not q.is_cuda:
        return "not on CUDA"
    if q.shape[-2] > MAX_DECODE_QUERY_LEN:
        return f"query length {q.shape[-2]} > {MAX_DECODE_QUERY_LEN} (prefill)"
    missing = launchers.missing()
    if missing is not None:
        return missing
    return launchers.load().decode.decode_attention_unsupported_reason(q, k, v, attn_mask, is_causal)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
              scale: float | None, enable_gqa: bool, use_kernel: bool, site: str = "") -> torch.Tensor:
    """Exact attention. q [B, Hq, Lq, D]; k, v [B, Hk, L, D] with Hk = Hq, or Hq % Hk == 0 and
    enable_gqa; attn_mask bool (True = attend) or additive, broadcastable to [B, Hq, Lq, L]. ``use_kernel``:
    try the decode kernel first (False: torch's SDPA always; so does a kernel that fails to compile).
    ``site``: where k, v are the model's own cache, the site's name: its bytes and tokens are recorded in
    ``lowering.core.stats`` (the figures a packed cache reports, for comparison). -> [B, Hq, Lq, Dv],
    contiguous."""
    if site:
        set_last(site, "cache_bytes", k.numel() * k.element_size() + v.numel() * v.element_size())
        set_last(site, "tokens", k.shape[2])
    if use_kernel and (enable_gqa or q.shape[1] == k.shape[1]):
        reason = kernel_reason(q, k, v, attn_mask, is_causal)
        if reason is None:
            mask = None if attn_mask is None else attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            try:
                out = launchers.load().decode.decode_attention(q, k, v, attn_mask=mask, scale=scale,
                                                               is_causal=is_causal)
            except KernelCompileError as error:
                reason = f"kernel failed to compile ({error})"
            else:
                calls["triton_decode"] += 1
                return out.contiguous()
        if q.is_cuda or reason.startswith("kernel failed"):
            calls[f"torch_sdpa: {reason}"] += 1
        log.debug("kvpass::attention on torch SDPA: %s", reason)
    calls["torch_sdpa"] += 1
    return exact_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa)
