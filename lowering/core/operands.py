"""Typed operands of the attention kernels: what a storage scheme hands a launcher, and the switch values
the kernels take as constexprs (the kernels wrap these same values in ``tl.constexpr``)."""
from __future__ import annotations

import dataclasses

import torch

# How K/V are stored (the decode kernel's ``KV_FORMAT``, a constexpr switch of its tile loader).
KV_FULL = 0  # the query's dtype, any strides
KV_SCALED_ROWS = 1  # int8 / fp8 codes [B, Hkv, L, D] times fp32 scales [B, Hkv, L]
KV_INT4 = 2  # KIVI 4-bit codes, residual window in full precision
KV_ALIGNED = 3  # 12-bit codes: int8 high part, 4-bit low part read on demand

# The mask operand (``MASK_KIND``, a constexpr switch instead of three copies of each kernel).
MASK_NONE = 0
MASK_BOOL = 1
MASK_ADDITIVE = 2

# The int4 fragment kernel (lowering/attention/decode/int4_fragments.py) serves bf16 decode steps of one query
# position with these head dims and at most this many query heads per KV head.
INT4_FRAGMENT_HEAD_DIMS = (64, 128)
INT4_FRAGMENT_MAX_GROUP = 8


def int4_fragments_serve(dtype: torch.dtype, head_dim: int, group: int, q_len: int) -> bool:
    """Whether int4 decode attention of this shape goes to the fragment kernel on CUDA: the scheme then scores keys
    without the query's split on every device, so the Triton kernel the CPU runs has the same numerics."""
    return (dtype == torch.bfloat16 and head_dim in INT4_FRAGMENT_HEAD_DIMS and group <= INT4_FRAGMENT_MAX_GROUP
            and q_len == 1)


# Keys of the scoring kernel (``KEY_FORMAT``).
KEYS_FULL = 0  # keys in the query's dtype, last dim contiguous
KEYS_INT8_ROWS = 1  # int8 codes [B, Hkv, n, D] times fp32 scales [B, Hkv, n]


@dataclasses.dataclass
class KVOperands:
    """What the decode kernel reads for K and V: full-precision tensors, or a packed cache's sections.

    ``k``/``v``: [B, Hkv, rows, D] tensors in q's dtype (``kv_format`` KV_FULL), or the code sections
    of a packed cache ([B, Hkv, rows, D or ceil(D / 2)] bytes, contiguous). ``extra``: the kernel's
    KS, VS, KZ, VZ, KR, VR sections (None where the format has none). ``kv_len`` tokens in all;
    ``quant_len`` in the code sections, ``res_len`` in int4's residual window. Aligned: ``stats``
    (int64 [2], incremented), ``skip_error``, ``value_bound``, ``tau`` (see the kernel's skip rule).
    """

    k: torch.Tensor
    v: torch.Tensor
    kv_len: int
    kv_format: int = KV_FULL
    extra: tuple = (None,) * 6
    quant_len: int = 0
    res_len: int = 0
    quant_group: int = 32
    rows_cap: int = 0  # rows per head of the per-token sections (0: quant_len; more: a capacity prefix)
    res_cap: int = 0  # rows per head of int4's residual section (0: res_len)
    stats: torch.Tensor | None = None
    skip_error: float = 0.0
    value_bound: float = 0.0
    tau: float = 0.0
    rotated: bool = False  # rows stored as x H (int8, lowering/core/rotation.py): the kernel rotates q and turns o back
    value_block: int = 0  # value codes in blocks of this many tokens, token-minor (lowering/storage/token_blocks.py)
    split_query: bool = False  # int8 / int4 keys: scores by int8 MMAs of the query's fixed-point split
    fragments: bool = False  # int4: the fragment kernel may serve (``int4_fragments_serve``; keys dequantized)


@dataclasses.dataclass
class KeySegment:
    """Keys of consecutive candidate columns of the scoring kernel: ``k`` [B, Hkv, n, D] in q's dtype, or
    int8 codes with ``scale`` fp32 [B, Hkv, n] (k ~= code * scale, as ``lowering.storage.int8.dequantize_rows``)."""

    k: torch.Tensor
    scale: torch.Tensor | None = None


@dataclasses.dataclass
class AppendOperands:
    """Where the quantize-on-append kernel writes a tensor's new rows: ``codes`` (int8 [B, Hkv, rows, D], or
    [B, Hkv, blocks, D, T] token blocks when ``blocked``) and ``scales`` fp32 [B, Hkv, rows], codes in
    [-qmax, qmax]; ``rotated``: the rows are stored as x H (``lowering.core.rotation.store_rows``)."""

    codes: torch.Tensor
    scales: torch.Tensor
    qmax: float
    rotated: bool
    blocked: bool


@dataclasses.dataclass(frozen=True)
class SlotRule:
    """A budgeted policy's decode rule as the slots kernel takes it (``lowering/attention/slots``): SnapKV (and ASL)
    protect the newest ``recent`` positions; H2O too, its scores accumulating this step's attention weights
    (``accumulates``: the caller hands them over); streaming (``sink`` set: its sinks' stored score) keeps ``n_sink``
    sinks and otherwise scores by position."""

    recent: int = 1
    sink: float | None = None
    n_sink: int = 0
    accumulates: bool = False


@dataclasses.dataclass
class ScoredKeys:
    """What the scoring kernel leaves for the attention over the kept tokens: ``weights`` fp32 [B, Hkv, C]
    (per candidate column); ``scores`` fp32 [B, Hq, Lq, C] (scale q.k + mask, -inf where not attended); ``q``
    the scored query [B, Hq, Lq, D]."""

    weights: torch.Tensor
    scores: torch.Tensor
    q: torch.Tensor
