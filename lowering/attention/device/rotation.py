"""The Hadamard rotation of int8's rows in registers: device code only (the host's twin and the scalings'
reasons: ``lowering/core/rotation.py``).

``butterfly`` is the fast Walsh-Hadamard transform of ``lowering.core.rotation.fwht``, stage for stage in the
same order: m = log2(D) stages of (a + b, a - b) at strides 1, 2, 4, ..., fp32 additions only, so the
quantize-on-append kernel stores the bits the host's path stores. Each stage pairs columns within blocks
of 2 * stride <= D, so columns padding D up to BLOCK_D are never mixed into the first D.

``signs`` is H itself, for the decode kernel's other way to rotate its query tile: one MMA (q times H
in the query's dtype, exact +-1 entries, fp32 accumulation) instead of the butterfly's register permutes,
a config switch (``rotate_query_by_mma``) until a GPU sweep picks one.
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


@triton.jit
def rotate_row(x, BLOCK_D: tl.constexpr, STAGES: tl.constexpr, SHIFT: tl.constexpr):
    """``rotate`` of one row x [BLOCK_D]."""
    return tl.reshape(rotate(tl.reshape(x, (1, BLOCK_D)), 1, BLOCK_D, STAGES, SHIFT), (BLOCK_D,))


@triton.jit
def signs(BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """H [BLOCK_D, BLOCK_D] as fp32 +-1 over its first HEAD_DIM rows and columns, 0 beyond:
    (-1)^popcount(i & j), generated in registers (indices below 256: three folds give the parity)."""
    i = tl.arange(0, BLOCK_D)
    bits = i[:, None] & i[None, :]
    bits = bits ^ (bits >> 4)
    bits = bits ^ (bits >> 2)
    bits = bits ^ (bits >> 1)
    inside = (i[:, None] < HEAD_DIM) & (i[None, :] < HEAD_DIM)
    return tl.where(inside, 1.0 - 2.0 * (bits & 1).to(tl.float32), 0.0)
