"""kv_bits=4: KIVI 4-bit keys and values with a full-precision residual window.

Follows KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024,
arXiv 2402.02750): keys have outlier *channels* (a few channels large for every token), so they are
quantized per channel, over groups of G = 32 tokens along the sequence (KIVI's group size: the range
of one channel over 32 tokens, not of the whole row, sets the step); values have no fixed outlier
channels and are quantized per token. Both asymmetric (scale and minimum), two 4-bit codes per byte
(channel j in byte j's low nibble, channel j + ceil(D / 2) in its high one: ``pack_nibbles``); value
bytes in 16-token blocks, token-minor (``Int4Kivi.VALUE_SLOTS``: the pairs of keys the kernel's P @ V takes).

Value groups: the whole row (all D channels) rather than 32-channel groups. Their step is the row's
range / 15; on Gaussian rows of D=128 a 32-channel group's range is only ~20% smaller (4.1 vs 5.2
standard deviations), for 4x the scale bytes (16 instead of 4 per token and head at 2-byte scales,
+18% on the 68-byte token): the 3x decode-speed target over bf16 is a bytes target, and value
outliers are per token (KIVI section 3), which a per-row scale already isolates.

Residual window: the last ``length % G`` tokens (the incomplete key group) are kept in the model's
dtype, keys and values, and quantized when the group fills. The layout is a pure function of the length
(``length // G`` full groups, ``length % G`` residual tokens), and a group's codes depend only on its own
G tokens, so appending token by token stores exactly what quantizing all at once does.

Scales and minima are stored in the model's dtype (its range holds the model's values: fp16 scales
would overflow on a bf16 model's large activations): per key group and channel [B, Hkv, L/G, D], per
value token [B, Hkv, L_q]. The minimum is a value of the data, so exact; the scale (max - min) / 15 is
rounded *up* to the dtype, so every code lies in 0..15 and |x - (code * scale + min)| <= scale / 2,
plus ``rounding_slack`` for the fp32 dequantization and the final rounding (``error_bound``).
Bytes per token and head at D=128, bf16: keys 64 + 2 x 2 x 128 / 32 = 80, values 64 + 4 = 68: 148 vs
512 (3.46x smaller).
"""
from __future__ import annotations

import torch

from lowering.core.operands import KV_INT4, KVOperands, int4_fragments_serve
from lowering.core.packed import Layout, copy_unless_same
from lowering.storage import State, register_scheme, token_blocks
from lowering.storage.int4_codes import dequantize_groups, pack_nibbles, quantize_groups, unpack_nibbles
from lowering.storage.int4_rows import Int4Rows
from lowering.storage.int8 import rounding_slack

GROUP = 32  # tokens per key group (KIVI)


def split_length(length):
    """(tokens in full groups, residual tokens): a pure function of the length, symbolic-safe."""
    return length // GROUP * GROUP, length % GROUP


@register_scheme(4)
class Int4Kivi:
    name = "int4 KIVI, keys per channel (groups of 32 tokens), values per token, residual window"
    group = GROUP
    # The fused kernel folds the value scale and minimum into the weights (bf16 / fp32 queries): it attends
    # over the exact values code * scale + min (``kernel_values``), keys as ``dequantize`` rounds them.
    kernel_folds_values = True

    @property
    def per_token_variant(self):
        """The per-token form token policies store (``int4_rows.py``): KIVI's key groups span 32 tokens."""
        return Int4Rows()

    # Value bytes in 16-token blocks [B, Hkv, quant / 16, ceil(D / 2), 16] (``token_blocks``), token t of a block at
    # slot 4 q + 2 e + s for t = 8 s + 2 q + e: each int32 word q holds keys 2q, 2q + 1 in its bytes 0, 2 and
    # keys 2q + 8, 2q + 9 in bytes 1, 3, the pairs of consecutive keys an MMA's value operand takes, so the
    # kernel makes each pair of codes by one mask of the word (``int4_tiles._value_tile``) instead of byte-wise
    # shared-memory reads and permutes.
    VALUE_SLOTS = tuple(4 * (t % 8 // 2) + 2 * (t % 2) + t // 8 for t in range(token_blocks.TOKENS))

    def _value_codes(self, state: State) -> torch.Tensor:
        """Value codes of the full groups, [B, Hkv, quant, Dv] (unpacked from the blocks)."""
        quant = state["v_scale"].shape[2]
        return unpack_nibbles(token_blocks.read_rows(state["v"], quant, self.VALUE_SLOTS), state["v_res"].shape[-1])

    # int4 keys by int8 MMAs of the query folded with each group's scales (lowering/attention/decode/int4_keys.py):
    # the kernel attends over the exact keys c * scale + min with scores within ``kernel_score_error``.
    split_query = True

    def splits_query(self, dtype: torch.dtype, dim: int, rows: int) -> bool:
        """Whether the kernel scores keys by the folded query's int8 split: 16-bit dtypes (fp32 keeps its exact
        dequantized keys), D > 32 (int8 MMAs reduce over a channel half of >= 32) and at most 8 query rows per KV
        head (GQA ratio x Lq: the fold's rows then fill at most half of the MMA's 16, ``int4_keys._stacked_parts``;
        the fold costs per group and row, and a 16-row fold costs more than it saves)."""
        return self.split_query and dtype in (torch.bfloat16, torch.float16) and dim > 32 and rows <= 8

    # True: the fragment kernel (lowering/attention/decode/int4_fragments.py) serves the shapes of
    # ``lowering.core.operands.int4_fragments_serve`` on CUDA, keys dequantized (the Triton kernel's unsplit path on
    # the CPU, its twin). False: the Triton kernel serves them.
    fragment_kernel = True

    def _fragments(self, q: torch.Tensor, state: State) -> bool:
        return self.fragment_kernel and int4_fragments_serve(q.dtype, q.shape[-1], q.shape[1] // state["k"].shape[1],
                                                             q.shape[2])

    def _splits(self, q: torch.Tensor, state: State) -> bool:
        """The split where ``splits_query`` offers it, except where the fragment kernel serves (its keys are
        dequantized, and so are the Triton kernel's, its twin on the CPU)."""
        if self._fragments(q, state):
            return False
        return self.splits_query(q.dtype, q.shape[-1], q.shape[1] // state["k"].shape[1] * q.shape[2])

    def kernel_keys(self, q: torch.Tensor, state: State, length: int):
        """The keys the kernel's scores for ``q`` are within ``kernel_score_error`` of, float64 [B, Hkv, L, D]:
        exact c * scale + min, the residual as stored (None: the kernel dequantizes keys as ``dequantize`` does)."""
        if not self._splits(q, state):
            return None
        codes, scale, low = self._key_groups(state)
        return torch.cat([codes * scale + low, state["k_res"].double()], 2)

    def kernel_score_error(self, q: torch.Tensor, state: State, length: int):
        """Bound of |kernel score - q . k_j| per (query row, key), float64 [B, Hq, Lq, L] before the softmax
        scale, k the ``kernel_keys`` (None where the kernel takes no split).

        The host twin of ``int4_keys.fold_query``: per row and group, q o scale (exact in fp32) is rounded to
        step * F, step = 2^(e - 13) for the row's largest |q_d scale_d| in [2^e, 2^(e+1)) (e >= -100), so each
        element moves by <= step / 2 and score j by step / 2 sum_d |c'_jd| (c' = c for the low channel half, the
        kernel's centred c - 8 for the high one); the integer dots are exact, and the fp32 conversions, the sum
        q . (min + 8 scale over the high half) and the final add err by < (D + 8) 2^-24 sum_d |q_d| (|c'_jd
        scale_d| + |min_d| + 8 scale_d). 0 on the residual window (its scores are the bf16 MMA's)."""
        if not self._splits(q, state):
            return None
        codes, scale, low = self._key_groups(state)
        B, H, quant, D = codes.shape
        centred = codes - 8.0 * (torch.arange(D, device=codes.device) >= (D + 1) // 2)
        q64 = q.double().reshape(B, H, -1, D)  # query heads of one KV head together, as torch's enable_gqa
        scale_g = scale[:, :, ::GROUP]  # [B, H, groups, D]
        top = (q64.abs()[:, :, :, None, :] * scale_g[:, :, None]).amax(-1)  # [B, H, g * Lq, groups]
        exponent = torch.frexp(top)[1] - 1  # floor(log2(top)); frexp(0) gives 0, clamped below as the kernel
        step = torch.exp2(torch.where(top > 0, exponent, -100).clamp_min(-100).double() - 13)
        rounding = step.repeat_interleave(GROUP, dim=-1) / 2 * centred.abs().sum(-1)[:, :, None, :]
        magnitude = (centred * scale).abs() + low.abs() + 8 * scale.abs()
        fp32 = (D + 8) * 2.0 ** -24 * (q64.abs() @ magnitude.transpose(-1, -2))
        error = (rounding * (1 + 2.0 ** -20) + fp32).reshape(*q.shape[:3], quant)
        return torch.cat([error, error.new_zeros(*q.shape[:3], length - quant)], -1)

    def _key_groups(self, state: State):
        """(codes, scale, min) of the quantized keys, float64 [B, Hkv, quant, D] each (scale, min per token)."""
        D = state["k_res"].shape[-1]
        expand = lambda t: t.double().repeat_interleave(GROUP, dim=2)  # noqa: E731
        return unpack_nibbles(state["k"], D).double(), expand(state["k_scale"]), expand(state["k_min"])

    def kernel_values(self, state: State, length: int):
        """(values the folded kernel attends over, float64 [B, Hkv, L, Dv]: c * scale + min exactly, the
        residual as stored; the magnitude its roundings scale with: |c * scale| + |min|, |residual|)."""
        cs = self._value_codes(state).double() * state["v_scale"].double()[..., None]
        low = state["v_min"].double()[..., None]
        res = state["v_res"].double()
        return torch.cat([cs + low, res], 2), torch.cat([cs.abs() + low.abs(), res.abs()], 2)

    def layout(self, batch, kv_heads, length, k_dim, v_dim, dtype) -> Layout:
        quant, res = split_length(length)
        bh = (batch, kv_heads)
        return {"k": ((*bh, quant, (k_dim + 1) // 2), torch.uint8),
                "k_scale": ((*bh, quant // GROUP, k_dim), dtype), "k_min": ((*bh, quant // GROUP, k_dim), dtype),
                "v": (token_blocks.shape(*bh, quant, (v_dim + 1) // 2), torch.uint8),
                "v_scale": ((*bh, quant), dtype), "v_min": ((*bh, quant), dtype),
                "k_res": ((*bh, res, k_dim), dtype), "v_res": ((*bh, res, v_dim), dtype)}

    def append(self, old: State | None, old_length: int, new_k, new_v, out: State) -> None:
        old_quant, old_res = split_length(old_length)
        if old is not None:  # full groups stay as they were
            for name in ("k", "v_scale", "v_min"):
                copy_unless_same(out[name][:, :, :old_quant], old[name])
            token_blocks.copy_blocks(out["v"], old["v"], old_quant)
            for name in ("k_scale", "k_min"):
                copy_unless_same(out[name][:, :, :old_quant // GROUP], old[name])
            # cat copies: the residual is read before ``out`` (maybe the same buffer) is written
            k, v = torch.cat([old["k_res"], new_k], 2), torch.cat([old["v_res"], new_v], 2)
        else:
            k, v = new_k, new_v
        length = old_length + new_k.shape[2]
        quant, res = split_length(length)
        filled = quant - old_quant  # tokens of the pending residual + new ones that complete groups
        if filled:
            B, H, _, Dk = k.shape
            codes, scale, low = quantize_groups(k[:, :, :filled].reshape(B, H, filled // GROUP, GROUP, Dk), dim=3)
            out["k"][:, :, old_quant:].copy_(pack_nibbles(codes.reshape(B, H, filled, Dk)))
            out["k_scale"][:, :, old_quant // GROUP:].copy_(scale.squeeze(3))
            out["k_min"][:, :, old_quant // GROUP:].copy_(low.squeeze(3))
            codes, scale, low = quantize_groups(v[:, :, :filled], dim=3)
            token_blocks.write_rows(out["v"], old_quant, pack_nibbles(codes), self.VALUE_SLOTS)
            out["v_scale"][:, :, old_quant:].copy_(scale.squeeze(3))
            out["v_min"][:, :, old_quant:].copy_(low.squeeze(3))
        out["k_res"].copy_(k[:, :, filled:])
        out["v_res"].copy_(v[:, :, filled:])

    def appends_to_residual(self, old_length: int, n: int) -> bool:
        """Whether ``n`` tokens appended to ``old_length`` stay in the residual window (complete no key group)."""
        return split_length(old_length)[1] + n < GROUP

    def append_residual(self, sections: State, old_length: int, new_k, new_v) -> None:
        """New tokens written at the residual window's fill of capacity ``sections`` (two row copies, no
        per-step views, no re-copy of the window): a decode step in place (``lowering.formats.launch``)."""
        _, res = split_length(old_length)
        n = new_k.shape[2]
        sections["k_res"][:, :, res:res + n].copy_(new_k)
        sections["v_res"][:, :, res:res + n].copy_(new_v)

    def _dequantize_quant(self, state: State, dtype):
        B, H, quant, _ = state["k"].shape
        Dk = state["k_res"].shape[-1]
        groups = quant // GROUP
        k_codes = unpack_nibbles(state["k"], Dk).reshape(B, H, groups, GROUP, Dk)
        k = dequantize_groups(k_codes, state["k_scale"][:, :, :, None], state["k_min"][:, :, :, None], dtype)
        v = dequantize_groups(self._value_codes(state), state["v_scale"][..., None],
                              state["v_min"][..., None], dtype)
        return k.reshape(B, H, quant, Dk), v

    def dequantize(self, state: State, length: int, dtype):
        k, v = self._dequantize_quant(state, dtype)
        return torch.cat([k, state["k_res"].to(dtype)], 2), torch.cat([v, state["v_res"].to(dtype)], 2)

    def error_bound(self, state: State, length: int, dtype):
        """Per-element bounds of |x - dequantized x| (float64): scale / 2 + roundings; 0 in the residual."""
        k, v = self._dequantize_quant(state, dtype)
        B, H, quant, Dk = k.shape
        k_step = state["k_scale"].double().repeat_interleave(GROUP, dim=2)
        ek = k_step / 2 + rounding_slack(k, dtype)
        ev = state["v_scale"].double()[..., None] / 2 + rounding_slack(v, dtype)
        zeros = lambda t: torch.zeros(t.shape, dtype=torch.float64, device=t.device)  # noqa: E731
        return torch.cat([ek, zeros(state["k_res"])], 2), torch.cat([ev, zeros(state["v_res"])], 2)

    def kernel_operands(self, q, state: State, length: int) -> KVOperands:
        quant, res = split_length(length)
        return KVOperands(state["k"], state["v"], length, KV_INT4,
                          tuple(state[n] for n in ("k_scale", "v_scale", "k_min", "v_min", "k_res", "v_res")),
                          quant_len=quant, res_len=res, quant_group=GROUP, rows_cap=state["v_scale"].stride(1),
                          res_cap=state["k_res"].stride(1) // max(1, state["k_res"].shape[-1]),
                          split_query=self._splits(q, state), value_block=token_blocks.TOKENS,
                          fragments=self._fragments(q, state))
