"""kv_bits=8: int8 keys and values, one symmetric scale per token and KV head.

Per-token scales suit both keys and values at 8 bits (KIVI, Liu et al. 2024, and KVQuant report
int8 per-token as near-lossless); they also let a token be written once and never requantized,
which a growing cache needs. Scales are float32: 4 bytes per token and head for K and V each, 3% of
the int8 payload at D=128 (fp16 scales would overflow for |x| > 8.3e6, which bf16 models can hold).

Rows are stored rotated by the Hadamard matrix H (head dims that are powers of two, ``lowering/core/rotation.py``):
keys and values are quantized as x H 2^-floor(m/2) (D = 2^m, H the +-1 Sylvester matrix, H H = D I), the
fused kernel attends with the query q H 2^-ceil(m/2) over them and turns its output back with
H 2^-ceil(m/2) (so q' . k' = q . k and the softmax weights are unchanged; every scaling is a power of two).
SmolLM2's key channels reach 2-5x their median maximum, and a per-token scale set by one outlier channel
leaves the other channels few steps; the rotation spreads every channel over all of them (QuaRot,
Ashkboos et al. 2024, rotates KV caches for the same reason; ``bench/int8_rotation.py`` measures it on
captured SmolLM2 attention). It needs no statistics from the prompt. On CUDA it costs no launch: the
quantize-on-append kernel rotates the new rows and the decode kernel the query and its output, in registers
(``lowering/attention/device/rotation.py``).

Round trip: ``dequantize`` computes ``code * scale`` in fp32 (one rounding, as the kernel), turns it
back with H in fp32 and rounds to the model's dtype. Unrotated (``rotation = False``, fp8, other head
dims) per element |x - x^| <= scale / 2 + ``rounding_slack``; rotated, an element sums D rotated
errors of at most scale / 2 with weights 2^-ceil(m/2) <= 1 / sqrt(D): <= sqrt(D) scale / 2, plus the fp32 rounding of
the two rotations (``error_bound``).
"""
from __future__ import annotations

import copy
import functools
import math

import torch

from lowering.core import rotation
from lowering.core.operands import KV_SCALED_ROWS, AppendOperands, KVOperands
from lowering.core.packed import Layout, copy_unless_same
from lowering.storage import State, register_scheme, token_blocks

QMAX = 127.0
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def rounding_unit(dtype: torch.dtype) -> float:
    """The relative error of one rounding to ``dtype``: its unit roundoff, doubled for bf16, which Triton's
    CPU interpreter truncates instead of rounding."""
    return UNIT_ROUNDOFF[dtype] * (2.0 if dtype == torch.bfloat16 else 1.0)


def rounding_slack(x_hat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bound of the roundings after the code: fp32 arithmetic of the dequantization (a few 2^-24
    relative, 2^-22 covers up to 4) and the final rounding to ``dtype`` (``rounding_unit``), as |x^|
    times a factor."""
    return x_hat.abs().double() * (1.01 * rounding_unit(dtype) + 2.0 ** -22)


def quantize_rows(x: torch.Tensor, qmax: float = QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (integer codes [..., D] as float32, float32 scale [...]) with x ~= code * scale,
    |code| <= qmax (round to nearest: |x - code * scale| <= scale / 2 up to fp32 rounding).

    The scale is the row's largest |x| times fp32(1 / qmax), on every device and in the append kernel: CUDA
    torch divides by a host scalar as a multiply by its reciprocal, so ``amax / qmax`` would give other bits
    there than on the CPU. ``x / scale`` is an IEEE division everywhere (both operands are tensors)."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1) * (1.0 / qmax)
    q = torch.round(x32 / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)).clamp(-qmax, qmax)
    return q, scale


@functools.cache
def _float8_values(device: torch.device) -> torch.Tensor:
    """float32 [256]: the value of every float8 e4m3 bit pattern (two are NaN, as e4m3fn defines them)."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn).float()


def codes_as_float(codes: torch.Tensor) -> torch.Tensor:
    """int8 or float8 e4m3 codes -> float32, equal to ``codes.float()``. Host float8 codes are looked up in
    their 256 values: torch's CPU conversion from float8 goes element by element, several times slower."""
    if codes.dtype == torch.float8_e4m3fn and not codes.is_cuda:
        return _float8_values(codes.device).take(codes.view(torch.uint8).long())
    return codes.float()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes_as_float(q) * scale.unsqueeze(-1)).to(dtype)


def copy_old_tokens(old: State | None, old_length: int, out: State, names) -> None:
    """Per-token sections ([B, Hkv, L, ...]) of ``old`` into the first ``old_length`` rows of ``out``."""
    if old is not None:
        for name in names:
            copy_unless_same(out[name][:, :, :old_length], old[name])


@register_scheme(8)
class Int8:
    name = "int8, per-token per-head scales"
    # The fused kernel attends over code * scale as exact products (scales applied to the scores and the
    # weights, never a dequantized tile rounded to the dtype): its oracle is ``dequantize`` in fp32.
    kernel_attends_over_products = True
    # One code per element and one fp32 scale per token and head; fp8 reuses all of it with its own two.
    code_dtype = torch.int8
    quantize = staticmethod(quantize_rows)
    # Rows stored as x H (module docstring); fp8 keeps them as they are.
    rotation = True

    def rotates(self, dim: int) -> bool:
        return self.rotation and rotation.rotates(dim)

    def without_rotation(self) -> "Int8":
        """This scheme reading its rows as stored (rotated rows stay rotated): the basis its kernel works in."""
        twin = copy.copy(self)
        twin.rotation = False
        return twin

    def stored_rows(self, x: torch.Tensor) -> torch.Tensor:
        """What is quantized for rows ``x`` [..., D]: x H 2^-floor(m/2) in fp32 where the scheme rotates."""
        return rotation.store_rows(x) if self.rotates(x.shape[-1]) else x

    # What the fused kernel does in registers (``ROTATE_STAGES``), for tests and bench/int8_rotation.py:
    def kernel_query(self, q: torch.Tensor) -> torch.Tensor:
        """The query it attends with over the stored rows: q H 2^-ceil(m/2), rounded once to q's dtype."""
        return rotation.turn_back(q).to(q.dtype) if self.rotates(q.shape[-1]) else q

    def kernel_output(self, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Its output over the stored values (fp32) turned back, o H 2^-ceil(m/2), rounded once to ``dtype``."""
        return (rotation.turn_back(out) if self.rotates(out.shape[-1]) else out).to(dtype)

    # Value codes in blocks of 16 tokens, token-minor (``lowering/storage/token_blocks.py``: the layout the
    # decode kernel's P @ V operand reads without byte-wise shared-memory loads); the per-token variant
    # (row-major values) serves the token policies, which move single rows.
    blocked_values = True
    # The kernel's key scores as two int8 MMAs of a 16-bit fixed-point split of the query against the codes
    # (int8 codes only; ``kernel_query_error``), instead of converting every key code to the query's dtype.
    split_query = True

    def layout(self, batch, kv_heads, length, k_dim, v_dim, dtype) -> Layout:
        rows = (batch, kv_heads, length)
        values = token_blocks.shape(batch, kv_heads, length, v_dim) if self.blocked_values else (*rows, v_dim)
        return {"k": ((*rows, k_dim), self.code_dtype), "v": (values, self.code_dtype),
                "k_scale": (rows, torch.float32), "v_scale": (rows, torch.float32)}

    @property
    def per_token_variant(self) -> "Int8":
        """This scheme with row-major values: one row per token in every section (token policies)."""
        twin = copy.copy(self)
        twin.blocked_values = False
        return twin

    def splits_query(self, dim: int) -> bool:
        """Whether the kernel takes the split at head dim ``dim``: int8 codes, and an MMA reduction of at least
        32 channels (int8 MMAs need K >= 32: head dims <= 16 keep the converted codes)."""
        return self.split_query and self.code_dtype == torch.int8 and dim > 16

    def split_kernel_query(self, q: torch.Tensor) -> torch.Tensor:
        """The query the kernel's key scores use, step * Q in float64 (``kernel_query`` where it takes no
        split): the host twin of ``split_query`` in ``lowering/attention/device/fixed_point.py`` (up to its fp32
        division's last bits), for bench/int8_rotation.py."""
        q = self.kernel_query(q)
        if not self.splits_query(q.shape[-1]):
            return q.double()
        q32 = q.float()
        q_max = q32.abs().amax(-1, keepdim=True)
        step = torch.where(q_max > 0, q_max * (1.0 / 32512.0), torch.ones_like(q_max))
        return torch.round(q32 / step).double() * step.double()

    def kernel_query_error(self, q: torch.Tensor) -> torch.Tensor | None:
        """Bound of |query the key scores use - ``kernel_query(q)``| per element, float64 [..., 1] (None: exact).

        The split: per query row, step = max|q| / 32512 (fp32), Q = round(q / step) (the kernel's fp32
        division may err by 2 ulp: |Q - q / step| <= 0.5 + 2^-6), Q = 256 hi + lo with hi, lo int8; scores are
        step * (256 (hi . c) + lo . c), the integer dots exact. So |step Q - q| <= (0.5 + 2^-6) step, 2^-16
        of the row's largest element: below one bf16 rounding of it (2^-9)."""
        if not self.splits_query(q.shape[-1]):
            return None
        return self.kernel_query(q).double().abs().amax(-1, keepdim=True) / 32512 * (1 + 2.0 ** -22) * (0.5 + 2.0 ** -6)

    # Whether CUDA appends go through the fused quantize-on-append kernel (``lowering/attention/append``, launched
    # by ``lowering.formats.launch.append``; the torch path below is its reference).
    fused_append = True
    code_max = QMAX  # the largest |code| (the append kernel's QMAX)

    def _blocked(self, name: str) -> bool:
        return name == "v" and self.blocked_values

    def copy_old(self, old: State | None, old_length: int, out: State) -> None:
        """The first step of ``append``: the ``old_length`` tokens of ``old`` into ``out``."""
        if old is not None and self.blocked_values:
            token_blocks.copy_blocks(out["v"], old["v"], old_length)
        copy_old_tokens(old, old_length, out, [n for n in out if not self._blocked(n)])

    def write_rows(self, name: str, x: torch.Tensor, out: State, start: int) -> None:
        """Rows x [B, Hkv, n, D] of ``name`` ("k" or "v") quantized into ``out`` at tokens start .. start + n - 1."""
        q, scale = self.quantize(self.stored_rows(x))
        if self._blocked(name):
            token_blocks.write_rows(out[name], start, q)
            token_blocks.clear_tail(out[name], start + q.shape[2])
        else:
            out[name][:, :, start:].copy_(q)
        out[name + "_scale"][:, :, start:].copy_(scale)

    def append_operands(self, name: str, x: torch.Tensor, out: State) -> AppendOperands:
        """What the quantize-on-append kernel writes for rows ``x`` of ``name``: ``write_rows`` in one launch."""
        return AppendOperands(out[name], out[name + "_scale"], self.code_max, self.rotates(x.shape[-1]),
                              self._blocked(name))

    def append(self, old: State | None, old_length: int, new_k, new_v, out: State) -> None:
        self.copy_old(old, old_length, out)
        for name, x in (("k", new_k), ("v", new_v)):
            self.write_rows(name, x, out, old_length)

    def code_values(self, state: State, name: str, length: int) -> torch.Tensor:
        """``code_rows`` as float32 values (the host decode path's operand)."""
        return codes_as_float(self.code_rows(state, name, length))

    def code_rows(self, state: State, name: str, length: int) -> torch.Tensor:
        """The codes of ``length`` tokens as rows [B, Hkv, length, D] (a copy where they are blocked)."""
        if self._blocked(name):
            return token_blocks.read_rows(state[name], length)
        return state[name][:, :, :length]

    def dequantize(self, state: State, length: int, dtype):
        out = []
        for name in ("k", "v"):
            codes, scales = self.code_rows(state, name, length), state[name + "_scale"][:, :, :length]
            if self.rotates(codes.shape[-1]):
                out.append(rotation.turn_back(dequantize_rows(codes, scales, torch.float32)).to(dtype))
            else:
                out.append(dequantize_rows(codes, scales, dtype))
        return tuple(out)

    def error_bound(self, state: State, length: int, dtype):
        """Per-element bounds of |x - dequantized x| for keys and values (float64, the caches' shapes)."""
        k, v = self.dequantize(state, length, dtype)
        out = []
        for name, x in (("k", k), ("v", v)):
            step = state[name + "_scale"].double().unsqueeze(-1) / 2
            dim = x.shape[-1]
            if self.rotates(dim):
                # sqrt(D) steps through H (the turn-back's entries are +-2^-ceil(m/2) <= D^-1/2); each fp32
                # rotation of a row errs by <= D 2^-24 times the row's L2 norm (lowering/core/rotation.py), twice
                # (x H, then c s H), with 2x margin.
                norm = x.double().norm(dim=-1, keepdim=True) + math.sqrt(dim) * step
                step = math.sqrt(dim) * step + 4 * dim * 2.0 ** -24 * norm
            out.append(step + rounding_slack(x, dtype))
        return tuple(out)

    def kernel_operands(self, q, state: State, length: int) -> KVOperands:
        return KVOperands(state["k"], state["v"], length, KV_SCALED_ROWS,
                          (state["k_scale"], state["v_scale"], None, None, None, None), quant_len=length,
                          rows_cap=state["k_scale"].stride(1), rotated=self.rotates(state["k"].shape[-1]),
                          value_block=token_blocks.TOKENS if self.blocked_values else 0,
                          split_query=self.splits_query(state["k"].shape[-1]))
