"""Host helpers the launchers share to size their grids. Plain Python: ``triton.cdiv`` and
``next_power_of_2`` cost microseconds per call on the launch path."""
from __future__ import annotations

import functools

import torch

CPU_SM_COUNT = 4  # nominal "SM count" under the CPU interpreter, so the split rules still split


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``CPU_SM_COUNT`` off CUDA)."""
    if device.type != "cuda":
        return CPU_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (or of size 1), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A mask as the kernels read it: a bool mask as its uint8 bytes, an additive one as it is."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def broadcast_strides(t: torch.Tensor) -> list[int]:
    """``t``'s strides, 0 along its size-1 dims (a mask broadcast over batch rows, heads or query rows)."""
    return [t.stride(i) if t.shape[i] > 1 else 0 for i in range(t.dim())]
