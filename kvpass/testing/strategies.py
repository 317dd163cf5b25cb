"""Hypothesis strategies that draw attention problems.

Every size parameter takes an int, a collection of values (``range(1, 65)``, ``(64, 128)``) or a
hypothesis strategy. ``None`` means the current profile's default (``profiles.default_sizes``),
so the same test draws small problems on CI and larger ones with KVPASS_HYPOTHESIS_PROFILE=gpu.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from hypothesis import strategies as st

from kvpass.testing import data
from kvpass.testing.problems import MASK_KINDS, MASK_VALUES, make_problem
from kvpass.testing.profiles import default_sizes

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 80, 96, 128, 256)
GQA_RATIOS = (1, 2, 4, 8, "mqa")
MQA_QUERY_HEADS = (4, 8, 12)  # query heads drawn for "mqa" (one KV head)
SPARSITIES = (0.0, 0.5, 0.9)


def default_device() -> str:
    """"cuda" when a GPU is visible, else "cpu" (what ``device="auto"`` picks)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _strategy(value, name: str) -> st.SearchStrategy:
    if isinstance(value, st.SearchStrategy):
        return value
    if isinstance(value, (int, str, torch.dtype)):
        return st.just(value)
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a value, a collection or a strategy, got {value!r}")
    values = tuple(value)
    if not values:
        raise ValueError(f"{name} is empty")
    return st.sampled_from(values)


def _kv_lens(sizes) -> st.SearchStrategy:
    ragged = sorted({m * b + d for b in sizes.block_sizes for m in (1, 2, 3) for d in (-1, 0, 1)
                     if 1 <= m * b + d <= sizes.max_kv_len})
    return st.one_of(st.integers(1, sizes.max_kv_len), st.sampled_from(ragged))


def _q_lens(sizes) -> st.SearchStrategy:
    # Decode, a few speculative tokens, prefill.
    return st.one_of(st.just(1), st.integers(2, 8), st.integers(9, sizes.max_q_len))


def attention_problems(*, batch_sizes=None, kv_heads=None, gqa_ratios=GQA_RATIOS, head_dims=HEAD_DIMS,
                       q_lens=None, kv_lens=None, dtypes=DTYPES, masks=MASK_KINDS, causal=(False, True),
                       left_padding: bool = True, distributions=None, explicit_scale: bool = True,
                       device: str = "cpu") -> st.SearchStrategy:
    """Strategy of ``AttentionProblem``: q [B, Hq, Lq, D], k/v [B, Hkv, L, D] (see ``ProblemSpec``).

    ``gqa_ratios``: Hq / Hkv, or "mqa" (Hkv = 1, Hq from ``MQA_QUERY_HEADS``). ``masks``: "none",
    "bool", "additive" (a mask is drawn with left padding when ``left_padding``, bottom-right
    causal structure, random sparsity, per-head or shared; additive ones with ALiBi-like biases and
    -inf or finfo.min). ``causal``: torch SDPA's top-left is_causal, only without a mask; half of
    the causal problems are square (L = Lq, prefill). ``distributions``: names from
    ``kvpass.testing.data.DISTRIBUTIONS`` (default: all); "masked_rows" is drawn only with a
    mask. ``explicit_scale``: sometimes pass scale = c / sqrt(D), c in [0.25, 2], instead of None.
    ``device``: where the tensors go ("auto": CUDA when available).
    """
    sizes = default_sizes()
    mask_kinds = tuple(masks)
    if not mask_kinds or any(m not in MASK_KINDS for m in mask_kinds):
        raise ValueError(f"masks must be a non-empty subset of {MASK_KINDS}, got {masks}")
    names = tuple(data.DISTRIBUTIONS) if distributions is None else tuple(distributions)
    unknown = [n for n in names if n not in data.DISTRIBUTIONS]
    if unknown:
        raise ValueError(f"unknown distributions {unknown}; known: {tuple(data.DISTRIBUTIONS)}")
    if mask_kinds == ("none",):
        names = tuple(n for n in names if n not in data.NEEDS_MASK)
    if not names:
        raise ValueError("no distribution left: masked rows need masks other than 'none'")
    device = default_device() if device == "auto" else device

    batch_st = _strategy(sizes.batch_sizes if batch_sizes is None else batch_sizes, "batch_sizes")
    kv_heads_st = _strategy(sizes.kv_heads if kv_heads is None else kv_heads, "kv_heads")
    ratio_st = _strategy(gqa_ratios, "gqa_ratios")
    head_dim_st = _strategy(head_dims, "head_dims")
    q_len_st = _q_lens(sizes) if q_lens is None else _strategy(q_lens, "q_lens")
    kv_len_st = _kv_lens(sizes) if kv_lens is None else _strategy(kv_lens, "kv_lens")
    dtype_st = _strategy(dtypes, "dtypes")
    causal_st = _strategy(causal, "causal")

    @st.composite
    def problems(draw):
        distribution = draw(st.sampled_from(names))
        dtype = draw(dtype_st)
        head_dim = draw(head_dim_st)
        batch = draw(batch_st)
        ratio = draw(ratio_st)
        if ratio == "mqa":
            n_kv, n_q = 1, draw(st.sampled_from(MQA_QUERY_HEADS))
        else:
            n_kv = draw(kv_heads_st)
            n_q = n_kv * ratio
        needs_mask = distribution in data.NEEDS_MASK
        is_causal = False if needs_mask or "none" not in mask_kinds else draw(causal_st)
        mask = "none" if is_causal else draw(st.sampled_from(
            tuple(m for m in mask_kinds if m != "none") if needs_mask else mask_kinds))
        q_len = draw(q_len_st)
        kv_len = draw(kv_len_st)
        if is_causal and draw(st.booleans()):
            kv_len = q_len  # square: a prefill
        fields = {}
        if mask != "none":
            mask_causal = kv_len >= q_len and draw(st.booleans())
            most = kv_len - q_len if mask_causal else kv_len - 1
            pads = ()
            if left_padding and draw(st.booleans()):
                pads = tuple(draw(st.lists(st.integers(0, most), min_size=batch, max_size=batch)))
            fields.update(mask_causal=mask_causal, left_pad=pads if any(pads) else (),
                          sparsity=draw(st.sampled_from(SPARSITIES)), mask_heads=draw(st.booleans()))
            if mask == "additive":
                fields.update(bias=draw(st.booleans()), mask_value=draw(st.sampled_from(MASK_VALUES)))
        scale = None
        if explicit_scale and draw(st.booleans()):
            scale = round(draw(st.floats(0.25, 2.0)) / math.sqrt(head_dim), 5)
        seed = draw(st.integers(0, 2 ** 32 - 1))
        return make_problem(batch=batch, q_heads=n_q, kv_heads=n_kv, q_len=q_len, kv_len=kv_len,
                            head_dim=head_dim, dtype=dtype, mask=mask, causal=is_causal, scale=scale,
                            distribution=distribution, seed=seed, device=device, **fields)

    return problems()


def decode_problems(**kwargs) -> st.SearchStrategy:
    """``attention_problems`` with Lq in 1..4 (decode and a few speculative tokens)."""
    kwargs.setdefault("q_lens", st.integers(1, 4))
    return attention_problems(**kwargs)


def prefill_problems(**kwargs) -> st.SearchStrategy:
    """``attention_problems`` with prefill query lengths (16 to the profile's maximum)."""
    kwargs.setdefault("q_lens", st.integers(16, max(16, default_sizes().max_q_len)))
    return attention_problems(**kwargs)
