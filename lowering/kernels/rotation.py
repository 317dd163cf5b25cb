"""The Hadamard rotation of int8's rows in registers: device code only (the host's twin and the scalings'
reasons: ``lowering/rotation.py``).

``butterfly`` is the fast Walsh-Hadamard transform of ``lowering.rotation.fwht``, stage for stage in the
same order: m = log2(D) stages of (a + b, a - b) at strides 1, 2, 4, ..., fp32 additions only, so the
quantize-on-append kernel stores the bits the host's path stores. Each stage pairs columns within blocks
of 2 * stride <= D, so columns padding D up to BLOCK_D are never mixed into the first D.
"""

import triton
import triton.language as tl


@triton.jit
def butterfly(x, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    """x [ROWS, BLOCK_D] fp32 -> x H over its first 2^STAGES columns (H unnormalised, +-1 entries)."""
    for stage in tl.static_range(STAGES):  # stride 1 << stage (inline: a constexpr cannot be reassigned)
        pairs = tl.permute(tl.reshape(x, (ROWS, BLOCK_D // (2 << stage), 2, 1 << stage)), (0, 1, 3, 2))
        a, b = tl.split(pairs)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (ROWS, BLOCK_D))
    return x


@triton.jit
def rotate(x, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr, SHIFT: tl.constexpr):
    """x [ROWS, BLOCK_D] -> x H 2^-SHIFT in fp32 (the power-of-two scaling is exact; first, as the host's)."""
    return butterfly(x.to(tl.float32) * (1.0 / (1 << SHIFT)), ROWS, BLOCK_D, STAGES)
