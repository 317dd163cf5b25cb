"""One decode token into an int4 KIVI cache laid out for a fixed capacity: device code only.

One program per (batch row, KV head). The token's position ``p`` is read from device memory (no host value),
``r = p % GROUP``. The program

- stores the new key and value rows in the residual window at row ``r`` (the open group's rows; none when the
  token completes its group, ``r = GROUP - 1``);
- quantizes the new value row per token (``int4_codes.quantize_groups`` over the channels) into its 16-token
  block slot (``VALUE_SLOTS``) and ``v_scale`` / ``v_min`` at ``p``: a row's codes depend on the row alone, so
  this stores what quantizing the group when it fills stores;
- when the token completes its group, quantizes the group's keys per channel (residual rows 0 .. GROUP - 2 and
  the new row) into the group's codes, ``k_scale`` and ``k_min``.

Codes and scales are ``quantize_groups``' bit for bit: min and max exact in the model's dtype, the scale
(max - min) / 15 in float64 rounded up to the dtype (round to nearest through fp32, then one step up where
that fell below: either neighbour of an intermediate rounding leads to the same smallest value >= the scale),
codes (x - min) / scale in float64 rounded half to even (the float64 magic number) and clamped to 0..15; byte
j holds channel j (low nibble) and j + HALF (high nibble). This replaces the torch path's ~110 small kernels
(window rebuilt, whole group quantized, scattered) by one launch per layer and step.
"""

import triton
import triton.language as tl

from lowering.attention.device.fixed_point import ROUND_MAGIC_F64

LEVELS = tl.constexpr(15.0)


@triton.jit
def _round_up_to(s64, DTYPE: tl.constexpr, BITS: tl.constexpr):
    """float64 s >= 0 rounded up to DTYPE (returned in DTYPE)."""
    if DTYPE == tl.float32:
        r = s64.to(tl.float32)
    else:
        r = s64.to(tl.float32).to(DTYPE)
    below = r.to(tl.float64) < s64
    up = (r.to(BITS, bitcast=True) + 1).to(BITS).to(DTYPE, bitcast=True)
    return tl.where(below, up, r)


@triton.jit
def _quantize(x, low, high, DTYPE: tl.constexpr, BITS: tl.constexpr):
    """codes (uint8 0..15) of x over [low, high] (broadcast), and the scale rounded up to DTYPE."""
    scale = _round_up_to((high.to(tl.float64) - low.to(tl.float64)) / LEVELS, DTYPE, BITS)
    s64 = scale.to(tl.float64)
    y = (x.to(tl.float64) - low.to(tl.float64)) / tl.where(s64 > 0.0, s64, 1.0)
    codes = tl.minimum(tl.maximum((y + ROUND_MAGIC_F64) - ROUND_MAGIC_F64, 0.0), LEVELS)
    return codes.to(tl.uint8), scale


@triton.jit
def int4_decode_append_kernel(
    Positions, NewK, NewV,  #
    KCodes, KScale, KMin, VCodes, VScale, VMin, KRes, VRes,  #
    heads,  #
    stride_nkb, stride_nkh, stride_nvb, stride_nvh,  # new rows [B, Hkv, 1, D], last dim contiguous
    stride_kcb, stride_kch, stride_kcn,  # key codes [B, Hkv, L, HALF] uint8
    stride_ksb, stride_ksh, stride_ksg,  # key scales and minima [B, Hkv, L / GROUP, D] (the same strides)
    stride_vcb, stride_vch, stride_vck,  # value codes [B, Hkv, L / 16, HALF, 16] uint8 (stride_vck: a block's)
    stride_vsb, stride_vsh,  # value scales and minima [B, Hkv, L] (the same strides, last dim contiguous)
    stride_krb, stride_krh, stride_krn,  # key residual [B, Hkv, GROUP - 1, D]
    stride_vrb, stride_vrh, stride_vrn,  # value residual [B, Hkv, GROUP - 1, D]
    SLOTS,  # int64 [16]: the block slot of token t % 16 (``Int4Kivi.VALUE_SLOTS``)
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,  # ceil(HEAD_DIM / 2): the bytes of a row
    BLOCK_H: tl.constexpr,  # next power of two >= HALF
    GROUP: tl.constexpr,
    TOKENS: tl.constexpr,  # tokens per value block
    DTYPE: tl.constexpr,
    BITS: tl.constexpr,  # the unsigned integer type of DTYPE's width (the round-up's next value)
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // heads
    h = pid % heads
    p = tl.load(Positions).to(tl.int64)
    r = p % GROUP
    j = tl.arange(0, BLOCK_H)
    lo_ok = j < HALF
    hi_ok = (j + HALF) < HEAD_DIM  # channel j + HALF exists (an odd HEAD_DIM pads the last high nibble)
    nk = NewK + b * stride_nkb + h * stride_nkh
    nv = NewV + b * stride_nvb + h * stride_nvh
    k_lo = tl.load(nk + j, mask=lo_ok, other=0.0)
    k_hi = tl.load(nk + HALF + j, mask=hi_ok, other=0.0)
    v_lo = tl.load(nv + j, mask=lo_ok, other=0.0)
    v_hi = tl.load(nv + HALF + j, mask=hi_ok, other=0.0)

    # the residual window's row r (the open group's; none when this token closes the group)
    open_row = (tl.zeros([BLOCK_H], dtype=tl.int64) + r) < GROUP - 1
    kr = KRes + b * stride_krb + h * stride_krh
    vr = VRes + b * stride_vrb + h * stride_vrh
    tl.store(kr + r * stride_krn + j, k_lo, mask=lo_ok & open_row)
    tl.store(kr + r * stride_krn + HALF + j, k_hi, mask=hi_ok & open_row)
    tl.store(vr + r * stride_vrn + j, v_lo, mask=lo_ok & open_row)
    tl.store(vr + r * stride_vrn + HALF + j, v_hi, mask=hi_ok & open_row)

    # the value row, per token: min and max over its channels (absent lanes stand in as channel 0)
    v_first = tl.load(nv)
    v_lo_all = tl.where(lo_ok, v_lo, v_first)
    v_hi_all = tl.where(hi_ok, v_hi, v_first)
    v_low = tl.minimum(tl.min(v_lo_all, 0), tl.min(v_hi_all, 0))
    v_high = tl.maximum(tl.max(v_lo_all, 0), tl.max(v_hi_all, 0))
    c_lo, v_scale = _quantize(v_lo, v_low, v_high, DTYPE, BITS)
    c_hi, _ = _quantize(v_hi, v_low, v_high, DTYPE, BITS)
    packed = c_lo | (tl.where(hi_ok, c_hi, 0).to(tl.uint8) << 4)
    slot = tl.load(SLOTS + p % TOKENS)
    tl.store(VCodes + b * stride_vcb + h * stride_vch + (p // TOKENS) * stride_vck + j * TOKENS + slot, packed,
             mask=lo_ok)
    tl.store(VScale + b * stride_vsb + h * stride_vsh + p, v_scale)
    tl.store(VMin + b * stride_vsb + h * stride_vsh + p, v_low.to(DTYPE))

    # the key group, per channel, once its last token is here
    if r == GROUP - 1:
        n = tl.arange(0, GROUP)
        from_res = (n < GROUP - 1)[:, None]
        rows = kr + n[:, None] * stride_krn
        w_lo = tl.load(rows + j[None, :], mask=from_res & lo_ok[None, :], other=0.0)
        w_hi = tl.load(rows + HALF + j[None, :], mask=from_res & hi_ok[None, :], other=0.0)
        w_lo = tl.where(from_res, w_lo, k_lo[None, :])
        w_hi = tl.where(from_res, w_hi, k_hi[None, :])
        g = p // GROUP
        ks = KScale + b * stride_ksb + h * stride_ksh + g * stride_ksg
        km = KMin + b * stride_ksb + h * stride_ksh + g * stride_ksg
        kc_lo, ks_lo = _quantize(w_lo, tl.min(w_lo, 0)[None, :], tl.max(w_lo, 0)[None, :], DTYPE, BITS)
        kc_hi, ks_hi = _quantize(w_hi, tl.min(w_hi, 0)[None, :], tl.max(w_hi, 0)[None, :], DTYPE, BITS)
        tl.store(ks + j[None, :], ks_lo, mask=lo_ok[None, :])
        tl.store(ks + HALF + j[None, :], ks_hi, mask=hi_ok[None, :])
        tl.store(km + j[None, :], tl.min(w_lo, 0)[None, :], mask=lo_ok[None, :])
        tl.store(km + HALF + j[None, :], tl.min(w_hi, 0)[None, :], mask=hi_ok[None, :])
        packed_k = kc_lo | (tl.where(hi_ok[None, :], kc_hi, 0).to(tl.uint8) << 4)
        kc = KCodes + b * stride_kcb + h * stride_kch + (g * GROUP + n[:, None]) * stride_kcn + j[None, :]
        tl.store(kc, packed_k, mask=lo_ok[None, :])
