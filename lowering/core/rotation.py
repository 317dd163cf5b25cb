"""The Hadamard rotation of int8's stored rows, on the host (``lowering/attention/device/rotation.py`` is the device's).

For a head dim D = 2^m the unnormalised Sylvester matrix H (entries +-1, H H = D I) is split in two
power-of-two scalings so that every scaling is exact: rows are stored as x H 2^-floor(m/2) and the
query attends as q H 2^-ceil(m/2), so q' . k' = q . k; the output over the stored values is turned back
by H 2^-ceil(m/2) as well, and so is a stored row. The only roundings are then the fp32 additions of the
butterfly (``fwht``): m of them per element, each adding <= 2^-24 of partial sums that stay below the
row's L1 norm, so an output element errs by <= m 2^-24 |x|_1 (times the scaling), within D 2^-24 |x|_2
times the scaling (Cauchy-Schwarz: |x|_1 <= sqrt(D) |x|_2, m sqrt(D) <= D).

``fwht`` does the butterfly stages in the order the kernels do (strides 1, 2, 4, ...): every addition
is an IEEE fp32 one on both sides, so a row rotated on the host and in the quantize-on-append kernel
holds the same bits, and so do their int8 codes.
"""
from __future__ import annotations

import torch


def rotates(dim: int) -> bool:
    """Whether rows of ``dim`` elements are rotated (powers of two >= 2)."""
    return dim >= 2 and dim & (dim - 1) == 0


def shifts(dim: int) -> tuple[int, int]:
    """(row shift, query shift) of a power-of-two ``dim`` = 2^m: floor(m / 2) and ceil(m / 2)."""
    m = dim.bit_length() - 1
    return m // 2, m - m // 2


def kernel_constants(dim: int, shift: int) -> dict:
    """The kernels' constexprs for rotating rows of ``dim`` by H 2^-shift (``attention/device/rotation.py``)."""
    return dict(ROTATE_STAGES=dim.bit_length() - 1, ROTATE_SHIFT=shift)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x H (unnormalised) over the last dim (a power of two) in fp32: the butterfly (a + b, a - b) at
    strides 1, 2, 4, ..., the order of ``lowering.attention.device.rotation.butterfly``."""
    y = x.float()
    dim = y.shape[-1]
    lead = y.shape[:-1]
    stride = 1
    while stride < dim:
        pairs = y.reshape(*lead, dim // (2 * stride), 2, stride)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(*lead, dim)
        stride *= 2
    return y


def rotate(x: torch.Tensor, shift: int) -> torch.Tensor:
    """x H 2^-shift in fp32 (the scaling is exact, and comes first so the butterfly's partial sums grow
    only as far as the result can: fp32 rows near its largest value do not overflow on the way)."""
    return fwht(x.float() * 2.0 ** -shift)


def store_rows(x: torch.Tensor) -> torch.Tensor:
    """What is quantized for rows x [..., D]: x H 2^-floor(m/2), fp32."""
    return rotate(x, shifts(x.shape[-1])[0])


def turn_back(x: torch.Tensor) -> torch.Tensor:
    """A query, an output or a dequantized row into the other basis: x H 2^-ceil(m/2), fp32."""
    return rotate(x, shifts(x.shape[-1])[1])


def signs(dim: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """The unnormalised Sylvester matrix [dim, dim]: (-1)^popcount(i & j) (symmetric, H H = dim I)."""
    i = torch.arange(dim, device=device)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)
