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
