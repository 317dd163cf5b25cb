"""Reductions (and the MMA wrapper) the kernels share, written so they run compiled and under the CPU
interpreter: device code only."""

import triton
import triton.language as tl


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add_combine(a, b):
    return a + b


# tl.max / tl.sum / tl.zeros are themselves @triton.jit library code, compiled (not interpreted)
# when triton was imported before TRITON_INTERPRET=1 was set (pytest's kvpass plugin does that);
# the kernels use tl.reduce with their own combine functions and tl.full so they run either way.
@triton.jit
def reduce_max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _max_combine)


@triton.jit
def reduce_sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add_combine)


@triton.jit
def mma_acc(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, the MMA accumulating into ``acc`` (fp32; None: a fresh accumulator)."""
    # UPCAST: the CPU interpreter multiplies bf16 bit patterns as integers in tl.dot
    # (triton-lang/triton#11584, "we just don't support it yet"). Upcasting the already-rounded
    # bf16 operands is exact, so the result equals a bf16 MMA with fp32 accumulation.
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    return mma_acc(a, b, None, PRECISION, UPCAST)
