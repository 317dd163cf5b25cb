"""``torch.ops.kvpass.*``: the ops rewritten graphs call, registered with ``torch.library`` so Dynamo and
Inductor trace them through their fake implementations (dynamic sequence lengths included)."""
from __future__ import annotations

import logging
from collections import Counter

import torch

from lowering.reference import exact_attention

log = logging.getLogger("kvpass.lowering")

# Decode and speculative-decoding steps (few query tokens) take the split-KV kernel; longer queries
# (prefill) are compute-bound and torch's flash/cuDNN kernels already serve them well.
MAX_KERNEL_QUERY_LEN = 16

# Run-time counts of which lowering served each call ("triton_decode", "torch_sdpa", and
# "torch_sdpa: <why not the kernel>" on CUDA). Plain dict updates: noise next to a kernel launch; not
# updated on CUDA-graph replays, which re-run the recorded kernels without Python.
calls: Counter = Counter()


def _kernel_reason(q, k, v, attn_mask, is_causal) -> str | None:
    """None when the Triton decode kernel takes these inputs, else why not."""
    if not q.is_cuda:
        return "not on CUDA"
    if q.shape[-2] > MAX_KERNEL_QUERY_LEN:
        return f"query length {q.shape[-2]} > {MAX_KERNEL_QUERY_LEN} (prefill)"
    try:
        from lowering.decode_attention import decode_attention_unsupported_reason
    except ImportError as e:  # triton missing
        return f"triton unavailable ({e})"
    return decode_attention_unsupported_reason(q, k, v, attn_mask, is_causal)


@torch.library.custom_op("kvpass::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              is_causal: bool, scale: float | None, enable_gqa: bool, use_kernel: bool) -> torch.Tensor:
    """Exact attention. q [B, Hq, Lq, D]; k, v [B, Hk, L, D] with Hk = Hq, or Hq % Hk == 0 and
    enable_gqa; attn_mask bool (True = attend) or additive, broadcastable to [B, Hq, Lq, L]."""
    if use_kernel and (enable_gqa or q.shape[1] == k.shape[1]):
        reason = _kernel_reason(q, k, v, attn_mask, is_causal)
        if reason is None:
            from lowering.decode_attention import decode_attention

            mask = None if attn_mask is None else attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            calls["triton_decode"] += 1
            return decode_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal).contiguous()
        if q.is_cuda:
            calls[f"torch_sdpa: {reason}"] += 1
        log.debug("kvpass::attention on torch SDPA: %s", reason)
    calls["torch_sdpa"] += 1
    return exact_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask, is_causal, scale, enable_gqa, use_kernel):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
