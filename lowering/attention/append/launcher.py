"""Launchers of the quantize-on-append kernels (``lowering/attention/append/``).

``append_rows`` (``kernel.py``) writes this step's rows of one tensor (keys or values) into a per-token scaled
int8 cache in one launch; the formats use it on CUDA (``lowering.formats.launch.append``) where
``lowering.storage.int8`` otherwise takes its torch path. ``append_int4_decode`` (``int4_kernel.py``) writes one
decode token at a device position into an int4 KIVI cache of fixed capacity (``lowering.formats.fixed_capacity``).
Tests run both under ``TRITON_INTERPRET=1`` against the torch paths.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowering.attention.append.int4_kernel import int4_decode_append_kernel
from lowering.attention.append.kernel import quantize_rows_append_kernel
from lowering.core.rotation import kernel_constants, shifts

MAX_HEAD_DIM = 256


def unsupported_reason(x: torch.Tensor, codes: torch.Tensor) -> str | None:
    if not x.is_cuda and x.device.type != "cpu":
        return f"device {x.device.type}"
    if x.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {x.shape[-1]} > {MAX_HEAD_DIM}"
    if x.stride(-1) != 1 or codes.stride(-1) != 1:
        return "rows not contiguous"
    if codes.dim() == 5 and codes.stride(-2) != codes.shape[-1]:
        return "token blocks not contiguous"
    return None


def append_rows(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, start: int | torch.Tensor, qmax: float,
                rotated: bool = False, blocked: bool = False) -> None:
    """Quantize x [B, Hkv, n, D] row by row into ``codes[:, :, start:start + n]`` (int8, or float8 e4m3 with
    ``qmax`` 448: ``lowering.storage.fp8.quantize_rows_fp8``) and
    ``scales[:, :, start:start + n]`` (fp32), as ``lowering.storage.int8.quantize_rows`` does; ``start`` an int,
    or an int64 tensor on x's device whose first element the kernel reads (no host value); ``rotated``
    (D a power of two): quantize ``lowering.core.rotation.store_rows(x)`` instead, rotated in the kernel;
    ``blocked``: codes [B, Hkv, blocks, D, T] in token blocks (``lowering/storage/token_blocks.py``)."""
    batch, heads, n, dim = x.shape
    if batch * heads * n == 0:
        return
    xs, cs, ss = x.stride(), codes.stride(), scales.stride()
    rotation = kernel_constants(dim, shifts(dim)[0]) if rotated else {}
    fp8 = codes.dtype == torch.float8_e4m3fn
    if fp8:
        codes = codes.view(torch.int8)  # the kernel stores e4m3 bytes
    quantize_rows_append_kernel[(batch * heads * n,)](
        x, codes, scales, heads, n, start,
        xs[0], xs[1], xs[2], cs[0], cs[1], cs[2], ss[0], ss[1], ss[2],
        QMAX=float(qmax), HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)),
        ROW_BLOCK=codes.shape[-1] if blocked else 0, START_IN_MEMORY=isinstance(start, torch.Tensor), FP8=fp8,
        num_warps=1 if dim <= 128 else 2, **rotation,
    )


_BITS = {torch.float32: tl.uint32, torch.float16: tl.uint16, torch.bfloat16: tl.uint16}
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def int4_decode_unsupported_reason(new_k: torch.Tensor, sections: dict) -> str | None:
    """None when ``append_int4_decode`` takes this token (one row per KV head, its dtype's scales)."""
    if not new_k.is_cuda and new_k.device.type != "cpu":
        return f"device {new_k.device.type}"
    if new_k.shape[2] != 1:
        return f"{new_k.shape[2]} new tokens (the kernel writes one)"
    if new_k.dtype not in _BITS:
        return f"dtype {new_k.dtype}"
    if new_k.shape[-1] > MAX_HEAD_DIM or sections["v_res"].shape[-1] != new_k.shape[-1]:
        return "head dims"
    return None


def append_int4_decode(positions: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor, sections: dict,
                       slots: torch.Tensor, group: int, tokens: int) -> None:
    """One token new_k, new_v [B, Hkv, 1, D] at device position ``positions[0]`` into int4 KIVI ``sections``
    (``lowering.storage.int4``'s layout at a fixed capacity, with a residual of ``group - 1`` rows): see
    ``int4_kernel``. ``slots``: int64 [tokens], the value block slot of each token of a block."""
    batch, heads, _, dim = new_k.shape
    new_k, new_v = new_k.contiguous(), new_v.contiguous()
    kc, ks, vc, vs, kr, vr = (sections[n] for n in ("k", "k_scale", "v", "v_scale", "k_res", "v_res"))
    assert sections["k_min"].stride() == ks.stride() and sections["v_min"].stride() == vs.stride()
    assert vc.stride(3) == tokens and vc.stride(4) == 1, "value blocks not contiguous"
    half = (dim + 1) // 2
    int4_decode_append_kernel[(batch * heads,)](
        positions, new_k, new_v, kc, ks, sections["k_min"], vc, vs, sections["v_min"], kr, vr, heads,
        new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), vs.stride(0), vs.stride(1),
        kr.stride(0), kr.stride(1), kr.stride(2), vr.stride(0), vr.stride(1), vr.stride(2), slots,
        HEAD_DIM=dim, HALF=half, BLOCK_H=max(16, triton.next_power_of_2(half)), GROUP=group, TOKENS=tokens,
        DTYPE=_TL_DTYPES[new_k.dtype], BITS=_BITS[new_k.dtype], num_warps=1 if dim <= 128 else 2,
    )
