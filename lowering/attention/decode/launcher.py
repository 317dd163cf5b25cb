"""Launcher of the split-KV decode-attention kernel (``lowering/attention/decode/kernel.py``).

Validates the inputs, picks the tiles and the number of KV splits, allocates the partial states and
launches the two stages. No host-device synchronisation, so a call can be captured in a CUDA graph.

Tiles and splits are picked by a rule, not autotuned (a decode step cannot afford a tuning run at
every new cache length). A decode step has few query rows, so without splits the grid has only
``B * Hkv`` programs (8 at B=1 on an 8-KV-head model) for 132 SMs. Splitting the keys gives
``B * Hkv * S`` programs; ``choose_num_splits`` aims at ``programs_per_sm * SM count`` of them,
with at least ``min_blocks_per_split`` key blocks each so the fp32 partials stay a small fraction
of the K/V bytes. ``default_config`` picks one of three tile configurations by how far
``B * Hkv`` alone goes towards filling the GPU (``RULE_CONFIGS``, one measured line each: the sweep of
``bench/attention_decode.py``). The rule depends on L only until the split count saturates, and the
kernels take L and the split size as unspecialised arguments, so a growing cache does not recompile them
every token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math

import torch
from triton.runtime.errors import OutOfResources

from lowering.attention import grid
from lowering.attention.compile_failure import KernelCompileError, is_compile_failure, summary
from lowering.attention.decode import fragments
from lowering.attention.decode import kernel as kernels
from lowering.attention.decode.group_mask import group_mask_kernel
from lowering.attention.device import merge
from lowering.attention.grid import broadcast_strides, cdiv, last_dim_contiguous, mask_bytes, next_power_of_2
from lowering.core.limits import MAX_DECODE_QUERY_LEN, masked_value
from lowering.core.operands import KV_FULL, KV_INT4, KV_SCALED_ROWS, MASK_ADDITIVE, MASK_BOOL, MASK_NONE, KVOperands
from lowering.core.rotation import kernel_constants, shifts

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_BLOCK_M = 64  # query rows per program; more rows (MQA with long Lq) go to further row blocks


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
    """Tiles and split rule of the decode kernel."""

    block_n: int = 64  # keys per step of stage 1
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 2  # target stage-1 programs per SM of the split rule
    whole_waves: bool = False  # the rule rounds the split count down, not up: programs_per_sm * SMs at most
    min_blocks_per_split: int = 4  # key blocks per split at least
    num_splits: int | None = None  # force a split count (tests, sweeps); None: the rule
    skip_masked_keys: bool = True  # skip K/V loads of keys that no row attends (masks only)
    split_block: int = 64  # splits merged per step of stage 2
    merge_num_warps: int = 4
    rotate_query_by_mma: bool = False  # rotated caches (int8): the query by one MMA, not the butterfly
    split_query: bool = True  # int8 / int4 keys: take the query's split where the scheme offers it (``KVOperands``)
    max_registers: int | None = None  # the int4 fragment kernel: registers per thread at most (ptxas maxnreg)
    f16_codes: bool = True  # fp8 codes under a bf16 query: the kernel's fp16 MMAs (``F16_CODES``; ``f16_codes``)

    def __post_init__(self):
        for name in ("block_n", "split_block"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        for name in ("num_warps", "merge_num_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16):
                raise ValueError(f"{name} must be one of 1, 2, 4, 8, 16, got {getattr(self, name)}")
        if self.num_stages < 1 or self.programs_per_sm < 1 or self.min_blocks_per_split < 1:
            raise ValueError(f"num_stages, programs_per_sm and min_blocks_per_split must be >= 1: {self}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1 or None, got {self.num_splits}")
        if self.max_registers is not None and not (24 <= self.max_registers <= 255 and self.max_registers % 8 == 0):
            raise ValueError(f"max_registers must be None or a multiple of 8 in 24..255, got {self.max_registers}")


# The rule's tile configurations, by how far B * Hkv * row_blocks (the programs of one split) goes
# towards filling the GPU; chosen by the H100 sweep of bench/attention_decode.py (bench/RESULTS.md).
RULE_CONFIGS = {
    # <= SMs / 8 (B=1 on 8 KV heads): few long splits of large tiles; 50.8 us at B=1, L=32k (88% of floor).
    "tiny": DecodeAttentionConfig(block_n=128, num_warps=4, num_stages=3, programs_per_sm=1),
    # < SMs (B=8): ~2 programs per SM; 96.2 us at B=8, L=8k and 355.3 us at L=32k.
    "small": DecodeAttentionConfig(block_n=64, num_warps=4, num_stages=2, programs_per_sm=2),
    # >= SMs (B=32): no split needed; 350.7 us at B=32, L=8k.
    "large": DecodeAttentionConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=1),
}


# The int4 fragment kernel's split rule (``fragments.py``): one-warp programs of 32-key tiles, about 16 per SM;
# num_stages 2 would load each tile's words during the previous tile (the kernel's PREFETCH), 1 does not.
FRAGMENT_CONFIG = DecodeAttentionConfig(block_n=32, num_warps=1, num_stages=1, programs_per_sm=16,
                                        min_blocks_per_split=4)


def grid_regime(programs_per_split: int, sm_count: int) -> str:
    """Which of ``RULE_CONFIGS`` applies to ``programs_per_split = B * Hkv * row_blocks`` programs."""
    if programs_per_split >= sm_count:
        return "large"
    return "tiny" if programs_per_split <= sm_count // 8 else "small"


def default_config(programs_per_split: int, sm_count: int) -> DecodeAttentionConfig:
    """The configuration the rule picks (tiles, warps, stages, split target)."""
    return RULE_CONFIGS[grid_regime(programs_per_split, sm_count)]


# Packed formats' tiles, by format and regime (sweep of ``bench/attention_quant.py --sweep``, Hq=32 Hkv=8
# D=128 bf16, B x L in 1 x 32k, 8 x 32k, 32 x 8k). The codes are 1/2 (int8) or 1/4 (int4) of bf16's bytes, so
# a tile of the bf16 rule keeps too few bytes in flight.
PACKED_RULES = {
    # int8 / fp8: 256-key tiles, 4 programs per SM (46.9 / 318.6 / 292.5 us against 53.2 / 380.6 / 327.8 with
    # the bf16 rule's 64-key tiles, H100). The query's split (two int8 MMAs) pays where programs fill the GPU,
    # not at B=1 (1 x 32k on an H200: 38.6 us with it, 35.0 without).
    KV_SCALED_ROWS: {
        regime: dict(block_n=256, num_warps=4, num_stages=3, programs_per_sm=4, min_blocks_per_split=4,
                     split_query=regime != "tiny")
        for regime in RULE_CONFIGS},
    # int4: one key group per tile (32 keys: its scales are one [D] row), 2 warps, 4 programs per SM (8 when
    # B * Hkv is between SMs / 8 and SMs): 51.3 / 371.7 / 305.7 us against 153.6 / 554.5 / 617.6 with the bf16
    # rule (H100); keys by int8 MMAs of the folded query (``int4_keys.py``) wherever the scheme offers it.
    KV_INT4: {
        regime: dict(block_n=32, num_warps=2, num_stages=3, programs_per_sm=8 if regime == "small" else 4,
                     min_blocks_per_split=4, split_query=True)
        for regime in RULE_CONFIGS},
}


def packed_config(programs_per_split: int, sm_count: int, kv: "KVOperands") -> DecodeAttentionConfig:
    """The rule's configuration for a packed format (``PACKED_RULES``; the bf16 rule for the others). int4
    tiles lie in one key group: the launcher caps them at it whatever the rule says."""
    regime = grid_regime(programs_per_split, sm_count)
    rule = PACKED_RULES.get(kv.kv_format)
    config = RULE_CONFIGS[regime]
    return config if rule is None else dataclasses.replace(config, **rule[regime])


def choose_num_splits(programs_per_split: int, kv_len: int, sm_count: int,
                      config: DecodeAttentionConfig) -> tuple[int, int]:
    """Return ``(num_splits, keys_per_split)``; ``keys_per_split`` is a multiple of ``block_n``."""
    num_blocks = max(1, cdiv(kv_len, config.block_n))
    if config.num_splits is not None:
        wanted = config.num_splits
    else:
        target = config.programs_per_sm * sm_count
        # Rounding up overshoots a wave of resident programs (8 x 32k, one-warp programs, 8 per SM on 132 SMs:
        # 17 splits of 64 programs, 1088 > 1056); rounding down stays within it.
        wanted = target // programs_per_split if config.whole_waves else cdiv(target, programs_per_split)
        wanted = min(wanted, max(1, num_blocks // config.min_blocks_per_split))
    wanted = max(1, min(wanted, num_blocks, 65535))  # 65535: CUDA's limit on grid dimension 1
    blocks_per_split = cdiv(num_blocks, wanted)
    return cdiv(num_blocks, blocks_per_split), blocks_per_split * config.block_n


SMEM_FALLBACK = 232448  # bytes of shared memory a block may opt into on an H100 / H200 (227 KB)


def shared_memory_bound(block_m: int, block_n: int, block_d: int, num_stages: int, elt: int,
                        gathered_mask: bool, code_bytes: float | None = None) -> int:
    """Upper bound of stage 1's shared memory in bytes: K and V tiles for ``num_stages - 1`` loads
    in flight, the Q tile and an fp32 [BLOCK_M, BLOCK_D] conversion, fp32 [BLOCK_M, BLOCK_N] layout
    conversions (twice as many with a gathered 2D mask). Checked against 180 sm_90 compiles
    (triton 3.9; BLOCK_D 16-256, BLOCK_M 16/64, BLOCK_N 32-128, 2-4 stages, bf16/fp32): never below
    the compiler's figure, exact at the largest tiles.

    ``code_bytes``: packed caches, bytes per stored K/V element (int8/fp8 1, int4 0.5): the loads in
    flight hold codes, plus one K and one V tile converted to ``elt`` for the dots (an estimate: not
    checked against compiles; the launcher's retry still catches a refusal)."""
    if code_bytes is None:
        tiles = max(1, num_stages - 1) * 2 * block_n * block_d * elt
    else:
        tiles = int(max(1, num_stages - 1) * 2 * block_n * block_d * code_bytes) + 2 * block_n * block_d * elt
    return tiles + block_m * block_d * (elt + 4) + block_m * block_n * 8 * (2 if gathered_mask else 1)


def _smaller(config: DecodeAttentionConfig) -> DecodeAttentionConfig | None:
    """The next configuration down in shared memory: fewer stages first, then smaller key blocks."""
    if config.num_stages > 2:
        return dataclasses.replace(config, num_stages=config.num_stages - 1)
    if config.block_n > 16:
        return dataclasses.replace(config, block_n=config.block_n // 2)
    return None


def fit_shared_memory(config: DecodeAttentionConfig, block_m: int, block_d: int, elt: int, gathered_mask: bool,
                      limit: int, code_bytes: float | None = None) -> DecodeAttentionConfig:
    """``config``, shrunk until ``shared_memory_bound`` fits ``limit`` (fp32 or D=256 tiles need it:
    BLOCK_N=128 with 3 stages takes 270 KB at fp32, D=128). Packed caches (``code_bytes``) fit larger
    tiles: the tiny config (BLOCK_N=128, 3 stages) takes 139 KB with int8 codes at bf16, D=128."""
    while shared_memory_bound(block_m, config.block_n, block_d, config.num_stages, elt, gathered_mask,
                              code_bytes) > limit:
        smaller = _smaller(config)
        if smaller is None:
            break
        config = smaller
    return config


@functools.lru_cache(maxsize=None)
def _smem_limit(device: torch.device) -> int:
    if device.type != "cuda":
        return SMEM_FALLBACK  # the interpreter has no limit: fit as an H100 would, so tests run its tiles
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", SMEM_FALLBACK)


# Configurations that a launch refused for shared memory (a Triton version allocating more than
# shared_memory_bound says), mapped to the one that launched: later calls go straight there.
_SHRUNK: dict[tuple, DecodeAttentionConfig] = {}
# (config, shape key, split query) -> why that kernel failed to compile: never asked for again.
_FAILED: dict[tuple, str] = {}


# Decided when the kernel module was imported (TRITON_INTERPRET=1 then): CPU tensors need it.
INTERPRETED = type(kernels.decode_attention_split_kernel).__name__ == "InterpretedFunction"


def decode_attention_unsupported_reason(q, k, v, attn_mask=None, is_causal=False) -> str | None:
    """None if the Triton kernel handles these inputs, else a short reason (for the fallback report)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor"
        if t.dim() != 4:
            return f"{name} has {t.dim()} dims, expected 4"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} not in fp32/fp16/bf16"
        if t.device != q.device:
            return f"{name} on {t.device}, q on {q.device}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes q={q.dtype} k={k.dtype} v={v.dtype}"
    if k.shape != v.shape:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        return f"k {tuple(k.shape)} does not match q {tuple(q.shape)}"
    return query_unsupported_reason(q, k.shape[1], k.shape[2], attn_mask)


def query_unsupported_reason(q, num_kv_heads: int, kv_len: int, attn_mask=None) -> str | None:
    """The checks of ``decode_attention_unsupported_reason`` on q and the mask alone (packed caches
    check their sections themselves)."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"q dtype {q.dtype} not in fp32/fp16/bf16"
    if q.device.type not in ("cuda", "cpu"):
        return f"device {q.device.type} not supported"
    if q.device.type == "cpu" and not INTERPRETED:
        return "CPU tensors need TRITON_INTERPRET=1 set before the kernel is imported"
    batch, num_heads, q_len, head_dim = q.shape
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        return f"Hq={num_heads} not a multiple of Hkv={num_kv_heads}"
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim} outside 1..{MAX_HEAD_DIM}"
    if not 1 <= q_len <= MAX_DECODE_QUERY_LEN:
        return f"query length {q_len} outside 1..{MAX_DECODE_QUERY_LEN}"
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            return "attn_mask is not a tensor"
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            return f"attn_mask dtype {attn_mask.dtype} is neither bool nor floating"
        if attn_mask.device != q.device:
            return f"attn_mask on {attn_mask.device}, q on {q.device}"
        target = (batch, num_heads, q_len, kv_len)
        if attn_mask.dim() > 4 or any(m not in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target))):
            return f"attn_mask {tuple(attn_mask.shape)} not broadcastable to {target}"
    return None


def decode_attention(q, k, v, attn_mask=None, scale=None, is_causal=False, *, out=None,
                     config: DecodeAttentionConfig | None = None) -> torch.Tensor:
    """Attention of a few query rows over a KV cache, in one Triton split-KV pass.

    Parameters
    ----------
    q : [B, Hq, Lq, D] fp32/fp16/bf16, 1 <= Lq <= 16, D <= 256, any strides.
    k, v : [B, Hkv, L, D], same dtype, Hq % Hkv == 0 (GQA/MQA: query head h reads KV head
        h // (Hq // Hkv), as torch's ``enable_gqa``; each K/V block is read once for the group).
    attn_mask : None, bool (True = attend) or additive float, broadcastable to [B, Hq, Lq, L];
        broadcast dimensions are read with stride 0, never materialised.
    scale : softmax scale, default 1/sqrt(D).
    is_causal : torch SDPA's top-left alignment: query i sees keys j <= i.
    out : optional contiguous [B, Hq, Lq, D] tensor of q's dtype to write into (tests poison it).
    config : tiles and split rule; None for ``default_config``.

    Returns
    -------
    [B, Hq, Lq, D] in q's dtype, computed with fp32 accumulation. A row with no attended key is 0.
    """
    reason = decode_attention_unsupported_reason(q, k, v, attn_mask, is_causal)
    if reason is not None:
        raise ValueError(f"decode_attention: {reason}")
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    return launch(q, KVOperands(k, v, k.shape[2]), attn_mask, scale, is_causal, out=out, config=config)


def launch(q, kv: KVOperands, attn_mask=None, scale=None, is_causal=False, *, out=None,
           config: DecodeAttentionConfig | None = None) -> torch.Tensor:
    """Launch both stages on validated inputs (``decode_attention`` and the packed caches' launchers).

    Raises :class:`KernelCompileError` where the kernel fails to compile for these constants (after trying
    the path without the query's split, where the operands offer one); the failure is remembered, so later
    calls raise at once."""
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = kv.k.shape[1], kv.kv_len
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(q.shape)} {q.dtype} tensor on {q.device}")
    if out.numel() == 0:
        return out
    q = last_dim_contiguous(q)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    # Top-left causal: no query sees past key Lq - 1, so the rest of the cache is never read.
    kv_len_read = min(kv_len, q_len) if is_causal else kv_len

    group = num_heads // num_kv_heads
    block_m = max(16, min(MAX_BLOCK_M, next_power_of_2(group * q_len)))
    # int4 splits the channels in two halves, each at least tl.dot's 16.
    block_d = max(32 if kv.kv_format == KV_INT4 else 16, next_power_of_2(head_dim))
    row_blocks = cdiv(group * q_len, block_m)
    programs_per_split = batch * num_kv_heads * row_blocks
    mask_kind, mask, mask_strides, mask_per_key = MASK_NONE, q, (0, 0, 0, 0), False
    if attn_mask is not None:
        mask = attn_mask.expand(batch, num_heads, q_len, kv_len)  # a view: stride 0 on broadcast dims
        mask_strides = tuple(broadcast_strides(mask))  # and on size-1 dims (one query head, one row)
        if mask.dtype == torch.bool:
            mask_kind, mask = MASK_BOOL, mask.view(torch.uint8)
        else:
            mask_kind = MASK_ADDITIVE
        # HF decode's [B, 1, 1, L] mask: the same for every row of a program, load it per key.
        mask_per_key = mask_strides[1] == 0 and (q_len == 1 or mask_strides[2] == 0)

    sm_count = grid.sm_count(q.device)
    rows = batch * num_heads * q_len
    if config is None and fragments.takes(q, kv, attn_mask, is_causal, mask_per_key):
        num_splits, keys_per_split = choose_num_splits(batch * num_kv_heads, kv_len_read, sm_count, FRAGMENT_CONFIG)
        prefetch = FRAGMENT_CONFIG.num_stages > 1
        max_registers = FRAGMENT_CONFIG.max_registers
        if not fragments.failed(q, kv, mask_kind, num_splits, prefetch, max_registers):
            part = _partials(rows, num_splits, head_dim, out)
            if fragments.launch(q, kv, None if attn_mask is None else mask, mask_kind, mask_strides, scale, out, part,
                                num_splits, keys_per_split, prefetch, max_registers):
                _merge(part, out, rows, num_splits, head_dim, block_d, FRAGMENT_CONFIG, {})
                return out
    config = config or packed_config(programs_per_split, sm_count, kv)
    code_bytes = None if kv.kv_format == KV_FULL else kv.k.element_size() * kv.k.shape[-1] / head_dim
    config = fit_shared_memory(config, block_m, block_d, q.element_size(),
                               mask_kind != MASK_NONE and not mask_per_key, _smem_limit(q.device), code_bytes)
    if kv.kv_format == KV_INT4 and kv.quant_group % config.block_n:
        # A tile lies in one key group: its scales fold into the query as one [D] row (int4_tiles.key_scores).
        config = dataclasses.replace(config, block_n=math.gcd(config.block_n, kv.quant_group))
    shape_key = (q.device, q.dtype, group, head_dim, block_m, mask_kind, mask_per_key, kv.kv_format)
    while (config, *shape_key) in _SHRUNK:
        config = _SHRUNK[(config, *shape_key)]
    split_query = kv.split_query and config.split_query
    f16 = f16_codes(q, kv, split_query, config)
    failed = _FAILED.get((config, *shape_key, split_query))
    if failed is not None:
        if split_query:  # the int4 / int8 path without the query's split takes the same operands
            return launch(q, kv, attn_mask, scale, is_causal, out=out,
                          config=dataclasses.replace(config, split_query=False))
        if f16:  # and fp8 codes converted to the query's dtype
            return launch(q, kv, attn_mask, scale, is_causal, out=out,
                          config=dataclasses.replace(config, f16_codes=False))
        raise KernelCompileError(f"decode kernel for {shape_key[1:]}: {failed}")
    num_splits, keys_per_split = choose_num_splits(programs_per_split, kv_len_read, sm_count, config)

    split_output = num_splits > 1
    part = _partials(rows, num_splits, head_dim, out)
    qs, ks, vs = q.stride(), kv.k.stride(), kv.v.stride()
    extra = [q if t is None else t for t in kv.extra]  # unused pointers: any tensor
    rotation = kernel_constants(head_dim, shifts(head_dim)[1]) if kv.rotated else {}
    logger.debug("decode_attention B=%d Hq=%d Hkv=%d Lq=%d L=%d D=%d splits=%d keys/split=%d mask=%d %s",
                 batch, num_heads, num_kv_heads, q_len, kv_len, head_dim, num_splits, keys_per_split, mask_kind,
                 config)

    on_other_gpu = q.device.type == "cuda" and q.device.index != torch.cuda.current_device()
    with torch.cuda.device(q.device) if on_other_gpu else contextlib.nullcontext():
        try:
            kernels.decode_attention_split_kernel[(programs_per_split, num_splits)](
                q, kv.k, kv.v, mask, out, part, *extra, q if kv.stats is None else kv.stats,
                qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], *mask_strides,
                num_kv_heads, q_len, kv_len_read, keys_per_split, scale,
                kv.quant_len, kv.res_len, kv.rows_cap or kv.quant_len, kv.res_cap or kv.res_len, kv.skip_error,
                kv.value_bound, 0.5 * kv.tau,
                GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_D=block_d,
                MASK_KIND=mask_kind, MASK_PER_KEY=mask_per_key, IS_CAUSAL=bool(is_causal),
                SKIP_MASKED_KEYS=config.skip_masked_keys and mask_kind != MASK_NONE,
                SPLIT_OUTPUT=split_output,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                UPCAST_DOT=q.device.type == "cpu" and q.dtype == torch.bfloat16,
                KV_FORMAT=kv.kv_format, QUANT_GROUP=kv.quant_group,
                FOLD_V_SCALE=q.dtype != torch.float16,
                num_warps=config.num_warps, num_stages=config.num_stages,
                ROTATE_QUERY_BY_MMA=bool(config.rotate_query_by_mma and kv.rotated), **rotation,
                VALUE_BLOCK=kv.value_block, SPLIT_QUERY=split_query,
                FOLD_ROWS=min(block_m, next_power_of_2(group * q_len)),
                F16_CODES=f16,
            )
        except OutOfResources:
            # shared_memory_bound was checked against one Triton version; another may allocate more.
            # Nothing was launched: shrink, remember, retry.
            smaller = _smaller(config)
            if smaller is None:
                raise
            logger.warning("decode_attention: %s ran out of shared memory for %s; retrying with block_n=%d "
                           "num_stages=%d", config, shape_key, smaller.block_n, smaller.num_stages)
            _SHRUNK[(config, *shape_key)] = smaller
            return launch(q, kv, attn_mask, scale, is_causal, out=out, config=smaller)
        except Exception as error:
            if not is_compile_failure(error):
                raise
            _FAILED[(config, *shape_key, split_query)] = summary(error)
            logger.warning("decode_attention: the kernel failed to compile for %s (%s, split query %s): %s",
                           shape_key, config, split_query, summary(error))
            return launch(q, kv, attn_mask, scale, is_causal, out=out, config=config)
        _merge(part, out, rows, num_splits, head_dim, block_d, config, rotation)
    return out


def f16_codes(q: torch.Tensor, kv: KVOperands, split_query: bool, config: DecodeAttentionConfig) -> bool:
    """Whether the split kernel takes its ``F16_CODES`` path: fp8 codes under a bf16 query (not split), unless the
    configuration turns it off (a compile failure of that path: the codes converted to bf16 instead)."""
    return (config.f16_codes and kv.kv_format == KV_SCALED_ROWS and kv.k.dtype == torch.float8_e4m3fn
            and q.dtype == torch.bfloat16 and not split_query)


def _partials(rows: int, num_splits: int, head_dim: int, out: torch.Tensor) -> torch.Tensor:
    """One fp32 buffer for the splits' partial outputs [rows, S, D] and their LSE [rows, S] (``merge.part_offsets``);
    ``out`` itself for one split (each allocation costs the host microseconds on a launch-bound path)."""
    if num_splits == 1:
        return out
    return torch.empty(rows * num_splits * (head_dim + 1), device=out.device, dtype=torch.float32)


def _merge(part, out, rows: int, num_splits: int, head_dim: int, block_d: int, config: DecodeAttentionConfig,
           rotation: dict) -> None:
    """Stage 2: merge the splits' partial states into ``out`` (nothing for one split)."""
    if num_splits > 1:
        merge.merge_splits_kernel[(rows,)](
            part, out, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d,
            SPLIT_BLOCK=min(config.split_block, max(16, next_power_of_2(num_splits))),
            num_warps=config.merge_num_warps, **rotation,
        )


GROUP_MASK_BLOCK = 1024


def group_mask(mask: torch.Tensor, positions: torch.Tensor, group: int) -> torch.Tensor:
    """``lowering.formats.fixed_capacity.kernel_mask`` in one launch (``group_mask.py``): mask [b, h, Lq, capacity]
    (bool or additive, dims broadcast or not), positions int64 [n] (the last one the last written) -> [b, h, Lq,
    capacity + 2 group - 1], contiguous."""
    b, h, q_len, capacity = mask.shape
    raw = mask_bytes(mask)
    masked = int(masked_value(mask.dtype)) if mask.dtype == torch.bool else masked_value(mask.dtype)  # a number
    width = capacity + 2 * group - 1
    out = torch.empty((b, h, q_len, width), dtype=raw.dtype, device=mask.device)
    st = broadcast_strides(raw)
    group_mask_kernel[(b * h * q_len, cdiv(width, GROUP_MASK_BLOCK))](
        raw, out, positions[-1:], h, q_len, *st, capacity, masked, GROUP=group, BLOCK=GROUP_MASK_BLOCK,
        num_warps=4)
    return out.view(torch.bool) if mask.dtype == torch.bool else out
