"""Limits every layer of ``lowering`` agrees on, defined once."""
from __future__ import annotations

import torch

# Query lengths up to this are decode steps (1) or speculative-decoding steps: the split-KV kernels take
# them. Longer queries are prefill, compute-bound, served by torch's flash/cuDNN kernels.
MAX_DECODE_QUERY_LEN = 16

# Additive mask entries below this are "masked": e^-1e4 is 0 in every float format; HF fills with
# finfo(dtype).min (<= -65504), ALiBi-like biases stay far above it.
MASKED_BELOW = -1e4


def masked_value(dtype):
    """The element that hides a key in a mask of ``dtype``: False in a bool mask, finfo(dtype).min (as HF fills)
    in an additive one."""
    return False if dtype == torch.bool else torch.finfo(dtype).min
