"""The mask a grouped scheme's decode kernel takes over a fixed-capacity cache, in one launch: device code only.

The host twin and the contract: ``lowering.formats.fixed_capacity.kernel_mask``. For the model's mask row
[capacity] and the length ``n`` (the last written position + 1, read on the device), output column o of
``capacity + 2 GROUP - 1`` is, with ``opened = n // GROUP``:

- o < capacity (the code sections): the model's mask at o, masked where o lies in the open group;
- capacity <= o < capacity + GROUP (the scratch group): masked;
- after (the residual rows i = o - capacity - GROUP): the model's mask at position opened * GROUP + i where that
  position is written (< n), else masked.

Masks move as their raw element type (a bool mask as bytes); ``MASKED`` is the masked element (0 for bool,
the dtype's lowest for an additive mask).
"""

import triton
import triton.language as tl


@triton.jit
def group_mask_kernel(
    Mask, Out, Last,  # mask [rows, capacity] (rows: b, h, Lq flattened; strides below), out [rows, width]
    heads, q_len,  # the mask's dims 1 and 2 (rows = dim0 x heads x q_len)
    stride_mb, stride_mh, stride_mq, stride_mk,  # the mask's (0 where a dim is broadcast)
    capacity, masked,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    width = capacity + 2 * GROUP - 1
    b = row // (heads * q_len)
    h = row // q_len % heads
    q = row % q_len
    n = tl.load(Last).to(tl.int64) + 1
    opened = n // GROUP
    res = o - capacity - GROUP  # residual row index
    position = tl.where(o < capacity, o, opened * GROUP + res)
    shown = tl.where(o < capacity, o // GROUP != opened, (res >= 0) & (position < n))
    position = tl.minimum(tl.maximum(position, 0), capacity - 1)
    value = tl.load(Mask + b * stride_mb + h * stride_mh + q * stride_mq + position * stride_mk,
                    mask=shown & (o < width), other=0)
    value = tl.where(shown, value, masked)  # the store converts to the mask's element type (exactly)
    tl.store(Out + row * width + o, value, mask=o < width)
