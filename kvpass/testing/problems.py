"""The attention problem a kernel is checked on, built deterministically from a small spec.

A problem is drawn as a ``ProblemSpec`` (shapes, dtype, mask layout, data distribution, seed) and
built by ``make_problem``: the same spec gives bit-identical tensors on every machine (the data is
drawn on the CPU in float64 from a seeded generator, then rounded to the dtype and moved). The
problem's ``repr`` is the ``make_problem(...)`` call that rebuilds it, so a failing example that
hypothesis prints can be pasted into ``@example(...)`` and pinned.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from kvpass.testing import data

MASK_KINDS = ("none", "bool", "additive")
MASK_VALUES = ("-inf", "min")  # additive masks: hide with -inf, or with finfo(dtype).min as HF does


@dataclasses.dataclass(frozen=True)
class ProblemSpec:
    """Everything that defines an attention problem; ``make_problem(**fields)`` builds it.

    The mask fields apply only when ``mask`` is "bool" or "additive" (torch SDPA forbids a mask
    together with ``causal``). A mask hides, per batch element, the first ``left_pad[b]`` keys
    (left padding), with ``mask_causal`` every key after the query's own position counted from the
    end of the cache (bottom-right: query i of Lq sits at position L - Lq + i), and a random
    ``sparsity`` fraction of the others; every query row keeps at least one key unless the
    distribution is "masked_rows".
    """

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    mask: str = "none"
    causal: bool = False  # torch SDPA is_causal: top-left, query i sees keys j <= i
    left_pad: tuple[int, ...] = ()
    mask_causal: bool = False
    sparsity: float = 0.0
    mask_heads: bool = False  # a mask per query head [B, Hq, Lq, L] instead of [B, 1, Lq, L]
    bias: bool = False  # additive masks: finite ALiBi-like position biases on the attended keys
    mask_value: str = "-inf"
    scale: float | None = None
    distribution: str = "normal"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        sizes = dict(batch=self.batch, q_heads=self.q_heads, kv_heads=self.kv_heads, q_len=self.q_len,
                     kv_len=self.kv_len, head_dim=self.head_dim)
        if any(v < 1 for v in sizes.values()):
            raise ValueError(f"sizes must be >= 1, got {sizes}")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"q_heads={self.q_heads} must be a multiple of kv_heads={self.kv_heads}")
        if self.mask not in MASK_KINDS:
            raise ValueError(f"mask must be one of {MASK_KINDS}, got {self.mask!r}")
        if self.mask_value not in MASK_VALUES:
            raise ValueError(f"mask_value must be one of {MASK_VALUES}, got {self.mask_value!r}")
        if self.distribution not in data.DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {tuple(data.DISTRIBUTIONS)}, got {self.distribution!r}")
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype must be float64/32/16 or bfloat16, got {self.dtype}")
        if self.causal and self.mask != "none":
            raise ValueError("causal=True takes no mask (torch SDPA forbids attn_mask with is_causal)")
        masked = (self.left_pad and any(self.left_pad)) or self.mask_causal or self.sparsity or self.mask_heads
        if self.mask == "none" and (masked or self.distribution == "masked_rows"):
            raise ValueError("left_pad, mask_causal, sparsity, mask_heads and 'masked_rows' need a mask")
        if self.left_pad and len(self.left_pad) != self.batch:
            raise ValueError(f"left_pad needs one entry per batch element, got {self.left_pad}")
        visible_from = self.kv_len - self.q_len if self.mask_causal else self.kv_len - 1
        if self.left_pad and not all(0 <= p <= visible_from for p in self.left_pad):
            raise ValueError(f"left_pad {self.left_pad} would leave a query with no key (at most {visible_from})")
        if self.mask_causal and self.kv_len < self.q_len:
            raise ValueError("mask_causal needs kv_len >= q_len (the queries are the cache's last positions)")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")

    def __repr__(self) -> str:
        # Only the fields that differ from their defaults, so the call stays short and pastes as is.
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            parts.append(f"{f.name}={value!r}")
        return f"make_problem({', '.join(parts)})"

    def _repr_pretty_(self, printer, cycle):
        printer.text(repr(self))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class AttentionProblem:
    """Inputs of one scaled-dot-product attention, with the spec that built them.

    q [B, Hq, Lq, D], k and v [B, Hkv, L, D] in ``spec.dtype``; ``attn_mask`` None, bool
    [B, 1|Hq, Lq, L] (True = attend) or additive in the dtype (0 / bias / -inf or finfo.min);
    ``is_causal`` torch SDPA's top-left causal; ``scale`` None for 1/sqrt(D). Query head h reads KV
    head h // (Hq // Hkv) (torch's ``enable_gqa``).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None
    is_causal: bool
    scale: float | None
    distribution: str
    spec: ProblemSpec

    def __repr__(self) -> str:
        return repr(self.spec)

    def _repr_pretty_(self, printer, cycle):  # hypothesis' printer: the call, not the tensors
        printer.text(repr(self))

    batch = property(lambda self: self.spec.batch)
    q_heads = property(lambda self: self.spec.q_heads)
    kv_heads = property(lambda self: self.spec.kv_heads)
    q_len = property(lambda self: self.spec.q_len)
    kv_len = property(lambda self: self.spec.kv_len)
    head_dim = property(lambda self: self.spec.head_dim)
    dtype = property(lambda self: self.spec.dtype)
    device = property(lambda self: self.q.device)
    group = property(lambda self: self.spec.q_heads // self.spec.kv_heads)

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim) if self.scale is None else self.scale

    def kwargs(self) -> dict:
        """The keyword arguments of an SDPA-style call: ``fn(p.q, p.k, p.v, **p.kwargs())``."""
        return dict(attn_mask=self.attn_mask, scale=self.scale, is_causal=self.is_causal)

    def to(self, device) -> AttentionProblem:
        """The same problem with its tensors on ``device`` (the spec keeps the device it was built on)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, q=move(self.q), k=move(self.k), v=move(self.v),
                                   attn_mask=move(self.attn_mask))


def make_problem(**fields) -> AttentionProblem:
    """Build the problem a ``ProblemSpec(**fields)`` describes (see ``ProblemSpec`` for the fields)."""
    spec = ProblemSpec(**fields)
    gen = torch.Generator().manual_seed(spec.seed)
    q, k, v = data.DISTRIBUTIONS[spec.distribution](spec, gen)
    mask = _build_mask(spec, gen)
    cast = lambda t: t.to(spec.dtype).to(spec.device)  # noqa: E731
    return AttentionProblem(q=cast(q), k=cast(k), v=cast(v),
                            attn_mask=None if mask is None else mask.to(spec.device),
                            is_causal=spec.causal, scale=spec.scale, distribution=spec.distribution, spec=spec)


def _build_mask(spec: ProblemSpec, gen: torch.Generator) -> torch.Tensor | None:
    if spec.mask == "none":
        return None
    heads = spec.q_heads if spec.mask_heads else 1
    B, Lq, L = spec.batch, spec.q_len, spec.kv_len
    visible = torch.ones(B, heads, Lq, L, dtype=torch.bool)
    key_pos = torch.arange(L)
    if spec.mask_causal:
        query_pos = torch.arange(Lq) + (L - Lq)
        visible &= key_pos[None, :] <= query_pos[:, None]
    for b, pad in enumerate(spec.left_pad):
        visible[b, :, :, :pad] = False
    if spec.sparsity:
        # Hide a random fraction of the keys, but keep each row's last visible key so no row empties.
        last = (visible * (key_pos + 1)).argmax(-1, keepdim=True)
        keep = torch.rand(B, heads, Lq, L, generator=gen, dtype=torch.float64) >= spec.sparsity
        keep.scatter_(-1, last, True)
        visible &= keep
    empty_rows = torch.zeros(B, heads, Lq, dtype=torch.bool)
    if spec.distribution == "masked_rows":
        empty_rows = torch.rand(B, heads, Lq, generator=gen, dtype=torch.float64) < 0.3
        empty_rows.view(-1)[torch.randint(empty_rows.numel(), (1,), generator=gen)] = True
        visible &= ~empty_rows[..., None]
    if spec.mask == "bool":
        return visible
    attended = torch.zeros(B, heads, Lq, L, dtype=torch.float64)
    if spec.bias:
        # ALiBi-like: a per-head slope times the distance to the query's position (finite, <= 0).
        slopes = torch.rand(heads, generator=gen, dtype=torch.float64) * 0.5
        distance = (torch.arange(Lq)[:, None] + (L - Lq) - key_pos[None, :]).abs()
        attended = -slopes[:, None, None] * distance
    hidden = float("-inf") if spec.mask_value == "-inf" else torch.finfo(spec.dtype).min
    additive = torch.where(visible, attended, hidden)
    additive[empty_rows] = float("-inf")  # the convention for rows with no key: -inf, output 0
    return additive.to(spec.dtype)
