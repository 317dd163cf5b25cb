"""Launcher of the quantize-on-append kernel (``lowering/attention/append/kernel.py``) for int8 caches.

``append_rows`` writes this step's rows of one tensor (keys or values) into a per-token scaled cache in
one launch; the formats use it on CUDA (``lowering.formats.launch.append``) where ``lowering.storage.int8``
otherwise takes its torch path. Tests run it under ``TRITON_INTERPRET=1`` against
``lowering.storage.int8.quantize_rows``.
"""
from __future__ import annotations

import torch
import triton

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


def append_rows(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, start: int, qmax: float,
                rotated: bool = False, blocked: bool = False) -> None:
    """Quantize x [B, Hkv, n, D] row by row into ``codes[:, :, start:start + n]`` (int8) and
    ``scales[:, :, start:start + n]`` (fp32), as ``lowering.storage.int8.quantize_rows`` does; ``rotated``
    (D a power of two): quantize ``lowering.core.rotation.store_rows(x)`` instead, rotated in the kernel;
    ``blocked``: codes [B, Hkv, blocks, D, T] in token blocks (``lowering/storage/token_blocks.py``)."""
    batch, heads, n, dim = x.shape
    if batch * heads * n == 0:
        return
    xs, cs, ss = x.stride(), codes.stride(), scales.stride()
    rotation = kernel_constants(dim, shifts(dim)[0]) if rotated else {}
    quantize_rows_append_kernel[(batch * heads * n,)](
        x, codes, scales, heads, n, start,
        xs[0], xs[1], xs[2], cs[0], cs[1], cs[2], ss[0], ss[1], ss[2],
        QMAX=float(qmax), HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)),
        ROW_BLOCK=codes.shape[-1] if blocked else 0,
        num_warps=1 if dim <= 128 else 2, **rotation,
    )
