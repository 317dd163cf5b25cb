"""Data distributions that break attention kernels.

Each distribution draws q [B, Hq, Lq, D], k and v [B, Hkv, L, D] in float64 on the CPU from the
seeded generator it is given (``make_problem`` then rounds them to the problem's dtype, so the
reference sees exactly the values the kernel sees). What each one targets:

- ``normal``: standard normal entries, logits of order 1 (the everyday case).
- ``one_dominant_key``: one key per KV head (first unpadded, last, or anywhere) whose logit sits
  ln(L) + 0..6 above the rest, so it takes 40-99 % of the weight: attention sinks; a skipped or
  duplicated block, or a running max that is not carried across blocks, shows at once.
- ``equal_scores``: every key of a KV head is the same vector, so all scores of a row tie and the
  output is the mean of the attended values: normalisation and masking errors show exactly.
- ``large_logits``: the largest |logit| scaled to 200, 2000 (past exp's fp32 overflow at 88.7)
  or towards the overflow of the dtype (fp16: sum |q||k| * scale at half of 65504; bf16 and fp32:
  the unscaled fp32 dot product at a quarter of fp32's range): a kernel that skips the max subtraction,
  or keeps scores or exponentials in fp16, produces inf or NaN.
- ``outlier_channels``: a few key channels carry a large offset shared by all tokens (8-20 standard
  deviations, as in real LLM keys, see KIVI and KVQuant), a large common part of every logit.
- ``masked_rows``: normal data; the mask leaves some query rows with no key at all (expected
  output 0, torch's math SDPA convention since 2.5).
- ``zero_values``: v is zero, so the output is exactly zero whatever the weights.
"""
from __future__ import annotations

import math

import torch

DISTRIBUTIONS = {}  # name -> fn(spec, generator) -> (q, k, v) float64 CPU tensors
NEEDS_MASK = frozenset({"masked_rows"})


def distribution(name):
    """Register a distribution under ``name`` (decorator)."""
    def register(fn):
        DISTRIBUTIONS[name] = fn
        return fn
    return register


def _shapes(spec):
    return ((spec.batch, spec.q_heads, spec.q_len, spec.head_dim),
            (spec.batch, spec.kv_heads, spec.kv_len, spec.head_dim))


def _normal(shape, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _scale(spec):
    return 1.0 / math.sqrt(spec.head_dim) if spec.scale is None else spec.scale


@distribution("normal")
def normal(spec, gen):
    q_shape, kv_shape = _shapes(spec)
    return _normal(q_shape, gen), _normal(kv_shape, gen), _normal(kv_shape, gen)


@distribution("masked_rows")
def masked_rows(spec, gen):
    return normal(spec, gen)  # the rows are emptied by the mask (problems._build_mask)


@distribution("zero_values")
def zero_values(spec, gen):
    q, k, v = normal(spec, gen)
    return q, k, torch.zeros_like(v)


@distribution("equal_scores")
def equal_scores(spec, gen):
    q, k, v = normal(spec, gen)
    k = _normal((spec.batch, spec.kv_heads, 1, spec.head_dim), gen).expand_as(k).clone()
    return q, k, v


@distribution("one_dominant_key")
def one_dominant_key(spec, gen):
    B, Hkv, L, D, G = spec.batch, spec.kv_heads, spec.kv_len, spec.head_dim, spec.q_heads // spec.kv_heads
    # The query heads sharing a KV head share a direction (as real queries do), so the key can
    # dominate for all of their rows at once: q = base + 0.5 noise.
    base = _normal((B, Hkv, 1, 1, D), gen)
    q = (base + 0.5 * _normal((B, Hkv, G, spec.q_len, D), gen)).reshape(B, spec.q_heads, spec.q_len, D)
    _, k, v = normal(spec, gen)
    q_mean = q.reshape(B, Hkv, G * spec.q_len, D).mean(2)  # [B, Hkv, D]
    # Logit of q_mean against the key: gap = ln(L) + U(0, 6) above the unit-variance others.
    gap = math.log(L) + 6.0 * torch.rand(B, Hkv, 1, generator=gen, dtype=torch.float64)
    dominant = gap / _scale(spec) * q_mean / q_mean.square().sum(-1, keepdim=True)
    first = torch.tensor(spec.left_pad or (0,) * B)[:, None].expand(B, Hkv)
    where = torch.randint(3, (B, Hkv), generator=gen)
    anywhere = torch.randint(L, (B, Hkv), generator=gen)
    position = torch.where(where == 0, first, torch.where(where == 1, L - 1, anywhere))
    k[torch.arange(B)[:, None], torch.arange(Hkv)[None, :], position] = dominant
    return q, k, v


@distribution("large_logits")
def large_logits(spec, gen):
    q, k, v = normal(spec, gen)
    scale = _scale(spec)
    fp32_max = torch.finfo(torch.float32).max
    # Largest |logit| bound: fp16 keeps half its range; otherwise the unscaled fp32 dot product
    # sum |q||k| stays under a quarter of fp32's range (a kernel scales after the dot).
    if spec.dtype == torch.float16:
        ceiling = torch.finfo(torch.float16).max / 2
    else:
        ceiling = min(torch.finfo(spec.dtype).max, fp32_max) / 4 * scale
    level = torch.randint(3, (), generator=gen).item()
    target = (2e2, 2e3, ceiling)[level]  # max |logit|
    G = spec.q_heads // spec.kv_heads
    k_rep = k.repeat_interleave(G, dim=1).transpose(-1, -2)
    largest = (scale * q @ k_rep).abs().amax().item()
    bound = (scale * q.abs() @ k_rep.abs()).amax().item()  # max over rows of scale * sum |q||k|
    factor = math.sqrt(min(target / largest, ceiling / bound))
    return q * factor, k * factor, v


@distribution("outlier_channels")
def outlier_channels(spec, gen):
    q, k, v = normal(spec, gen)
    B, Hkv, D = spec.batch, spec.kv_heads, spec.head_dim
    n_outliers = min(D, 1 + torch.randint(4, (), generator=gen).item())
    channels = torch.randperm(D, generator=gen)[:n_outliers]
    sign = torch.randint(2, (B, Hkv, 1, n_outliers), generator=gen) * 2 - 1
    offset = sign * (8.0 + 12.0 * torch.rand(B, Hkv, 1, n_outliers, generator=gen, dtype=torch.float64))
    spread = 1.0 + 2.0 * torch.rand(B, Hkv, 1, n_outliers, generator=gen, dtype=torch.float64)
    k[..., channels] = offset + spread * k[..., channels]
    return q, k, v
