"""kv_bits="aligned": precision-aligned 12-bit cache (AlignedKV), high and low parts stored apart.

Follows AlignedKV (Tan et al., arXiv 2409.16546): in a dot product a term far below the largest one
loses its low bits in the sum anyway, so the kernel need not read them. Here each token and KV head gets
one fp32 step s = max|x| / 2039 and a 12-bit code C = round(x / s), |C| <= 2039, split as C = 16 h + l:
the high part h (int8, [B, Hkv, L, D]) and the low part l in [-8, 7] (a nibble, stored + 8, two per
byte, [B, Hkv, L, ceil(D / 2)]) in separate sections. Values: the full code gives |x - C s| <= s / 2
(12 bits, 16x finer than int8); the high part alone 16 h s, within 8.5 s. Dequantization is one product
of an exact integer and s in fp32 (kernel and ``dequantize`` agree to the bit), rounded to the dtype.
Bytes per token and head: 1.5 D + 4 for K and V each (200 vs 256 at D=128 bf16); the kernel reads
D + 4 always and the D / 2 low bytes only for the blocks that need them.

Which blocks need them (the kernel's skip rule, ``lowering/attention/decode/kernel.py``): a block's
low parts are skipped while a bound on everything skipped so far stays within ``tau`` (default 2^-8,
a bf16 unit roundoff) times the attention-weighted row magnitude sum_j p_j max|v_j|; unlike AlignedKV's
per-channel exponent test (which relies on fp16 accumulation), the rule
is a worst-case bound, valid with fp32 accumulation, for GQA (all query heads of a KV head must agree)
and across splits. The kernel counts the tokens whose low parts it read (``stats``): bytes read =
tokens x 2 (D + 4) + low tokens x 2 ceil(D / 2).
"""
from __future__ import annotations

import torch

from lowering.core.operands import KV_ALIGNED, KVOperands
from lowering.core.packed import Layout
from lowering.storage import State, register_scheme
from lowering.storage.int8 import UNIT_ROUNDOFF, copy_old_tokens, quantize_rows, rounding_slack

CODE_MAX = 2039.0  # 16 * 127 + 7: the high part fits int8 for every |C| <= CODE_MAX
LOW_MAX = 8.0  # |l| <= 8, so |C s - 16 h s| <= 8 s
TAU = 2.0 ** -8


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 low parts 0..15 [..., D] -> [..., ceil(D / 2)] bytes: channel 2j low nibble, 2j + 1 high (the
    kernel's ``_load_aligned_low`` reads them in this order)."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)[..., :dim]


def split_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12-bit codes (float, |C| <= 2039) -> (int8 high h, uint8 low l + 8 in 1..15) with C = 16 h + l."""
    c = codes.to(torch.int32)
    high = torch.div(c + 8, 16, rounding_mode="floor")
    return high.to(torch.int8), (c - 16 * high + 8).to(torch.uint8)


def kernel_bounds(dtype: torch.dtype, interpreted: bool) -> tuple[float, float]:
    """(skip_error, value_bound) of the skip rule, in steps s: |high-only - full| <= 8 s plus both
    tiles' roundings to the dtype (u (|C| + |16 h|) s <= 2 u 2047 s); |v| <= 2039 s (1 + 2 u)."""
    u = UNIT_ROUNDOFF[dtype] * (2.0 if interpreted and dtype == torch.bfloat16 else 1.0)
    return LOW_MAX + 2 * u * 2048.0, CODE_MAX * (1 + 2 * u)


@register_scheme("aligned")
class Aligned:
    name = "aligned 12-bit (int8 high + 4-bit low parts, low read on demand)"
    tau = TAU

    def layout(self, batch, kv_heads, length, k_dim, v_dim, dtype) -> Layout:
        rows = (batch, kv_heads, length)
        return {"k": ((*rows, k_dim), torch.int8), "v": ((*rows, v_dim), torch.int8),
                "k_scale": (rows, torch.float32), "v_scale": (rows, torch.float32),
                "k_low": ((*rows, (k_dim + 1) // 2), torch.uint8), "v_low": ((*rows, (v_dim + 1) // 2), torch.uint8)}

    def append(self, old: State | None, old_length: int, new_k, new_v, out: State) -> None:
        copy_old_tokens(old, old_length, out, out)
        for name, x in (("k", new_k), ("v", new_v)):
            codes, scale = quantize_rows(x, CODE_MAX)
            high, low = split_codes(codes)
            out[name][:, :, old_length:].copy_(high)
            out[name + "_low"][:, :, old_length:].copy_(pack_nibbles(low))
            out[name + "_scale"][:, :, old_length:].copy_(scale)

    def codes(self, state: State, name: str, high_only: bool = False) -> torch.Tensor:
        """The codes 16 h (+ l) as float32 [B, Hkv, L, D]."""
        code = 16.0 * state[name].float()
        if not high_only:
            code = code + unpack_nibbles(state[name + "_low"], state[name].shape[-1]).float() - 8.0
        return code

    def dequantize(self, state: State, length: int, dtype, high_only: bool = False):
        return tuple((self.codes(state, n, high_only) * state[n + "_scale"][..., None]).to(dtype) for n in ("k", "v"))

    def error_bound(self, state: State, length: int, dtype, high_only: bool = False):
        """Per-element bounds of |x - dequantized x| (float64): s / 2 (high parts only: 8.5 s) + roundings."""
        steps = (LOW_MAX + 0.5) if high_only else 0.5
        return tuple(state[n + "_scale"].double()[..., None] * steps + rounding_slack(x, dtype)
                     for n, x in zip(("k", "v"), self.dequantize(state, length, dtype, high_only)))

    # The kernel's half-precision output was measured wrong on CUDA at head dim 16 (right at 32, 64, in fp32 and
    # under the interpreter; bench/RESULTS.md); cause not found, so on CUDA smaller head dims take the reference.
    MIN_CUDA_HEAD_DIM = 32

    def kernel_refusal(self, q) -> str | None:
        if q.is_cuda and q.dtype != torch.float32 and q.shape[-1] < self.MIN_CUDA_HEAD_DIM:
            return f"aligned kernel unverified on CUDA below head dim {self.MIN_CUDA_HEAD_DIM} in {q.dtype}"
        return None

    def kernel_operands(self, q, state: State, length: int, tau: float | None = None,
                        stats: torch.Tensor | None = None) -> KVOperands:
        """``tau``: the skip rule's budget (None: ``self.tau``; 0 reads every low part, inf none);
        ``stats``: int64 [2] the kernel adds (tokens whose low parts it read, tokens read) to. The kernel
        takes CPU tensors only under Triton's interpreter, which truncates bf16 (``kernel_bounds``)."""
        skip_error, value_bound = kernel_bounds(q.dtype, q.device.type == "cpu")
        if stats is None:
            stats = torch.zeros(2, dtype=torch.int64, device=q.device)
        return KVOperands(state["k"], state["v"], length, KV_ALIGNED,
                          (state["k_scale"], state["v_scale"], None, None, state["k_low"], state["v_low"]),
                          quant_len=length, rows_cap=state["k_scale"].stride(1), stats=stats,
                          skip_error=skip_error, value_bound=value_bound,
                          tau=self.tau if tau is None else tau)
