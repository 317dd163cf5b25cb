"""The tolerance model: how far a correct kernel's output may be from the float64 reference.

One function per variant, found through ``register_tolerance``; tests never write their own
numbers. ``attention_tolerance`` gives a bound from the sizes alone (scalars); ``tolerance_for``
gives the tighter per-element bound of one problem, computed from its data in float64.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import torch

from kvpass.testing.oracles import F64, grouped_matmul, logit_bias, reference_scores, safe_softmax
from kvpass.testing.problems import AttentionProblem

# Unit roundoff (half an ulp at 1) of each dtype: significand bits p give 2^-p.
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}
TF32_ROUNDOFF = 2.0 ** -11  # tf32 keeps fp16's 10 explicit significand bits
FP16_SUBNORMAL_ERROR = 2.0 ** -25  # half the spacing of fp16 subnormals (2^-24)
# fp32 (and bf16, which shares its exponent range) values below 2^-126 may be flushed to 0 (GPU exp and
# conversions with flush-to-zero): the absolute error of a weight or an output that underflows.
FP32_UNDERFLOW_ERROR = 2.0 ** -126
INPUT_PRECISIONS = ("ieee", "tf32")  # the names of Triton's tl.dot input_precision
METRICS = ("elementwise", "sqnr_db")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Allowed error: elementwise ``|out - ref| <= atol + rtol * |ref|`` (``atol`` a float or a
    tensor broadcastable to the output), or ``metric="sqnr_db"``: SQNR >= ``min_sqnr_db``.
    ``why`` says where the numbers come from (failure messages print it)."""

    atol: float | torch.Tensor
    rtol: float
    metric: str = "elementwise"
    min_sqnr_db: float | None = None
    why: str = ""

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.metric == "sqnr_db" and self.min_sqnr_db is None:
            raise ValueError("metric='sqnr_db' needs min_sqnr_db")

    def allowed(self, ref: torch.Tensor) -> torch.Tensor:
        """The largest |out - ref| allowed at each element (elementwise metric)."""
        return self.atol + self.rtol * ref.abs()


@dataclasses.dataclass(frozen=True)
class ErrorModel:
    """Relative errors of the steps of an exact kernel (see ``exact_tolerance``)."""

    score: float  # |delta s_j| <= score * (scale * sum_i |q_i||k_ji| + |mask_j|)
    pv: float  # probabilities (and v, for tf32) rounded before the PV product
    accumulate: float  # fp32 sums over the L keys: PV, the normaliser, block rescales
    out: float  # output rounded to the dtype
    subnormal: float  # absolute error per fp16 probability below 2^-14 (0 for other dtypes)
    underflow: float = FP32_UNDERFLOW_ERROR  # absolute, per fp32 weight below 2^-126 (flushed to 0)
    out_floor: float = FP32_UNDERFLOW_ERROR  # absolute: an output below the dtype's normal range


_TOLERANCES: dict[str, Callable[..., Tolerance]] = {}


def register_tolerance(variant: str):
    """Register ``fn(dtype, head_dim, kv_len=None, **options) -> Tolerance`` for ``variant``."""
    def register(fn):
        if variant in _TOLERANCES:
            raise ValueError(f"a tolerance for variant {variant!r} is already registered")
        _TOLERANCES[variant] = fn
        return fn
    return register


def registered_variants() -> tuple[str, ...]:
    return tuple(_TOLERANCES)


def attention_tolerance(dtype: torch.dtype, head_dim: int, kv_len: int | None = None, variant: str = "exact",
                        **options) -> Tolerance:
    """The allowed error of ``variant`` for these sizes; ``options`` go to the variant's model."""
    if variant not in _TOLERANCES:
        raise ValueError(f"no tolerance registered for variant {variant!r}; registered: {registered_variants()}")
    return _TOLERANCES[variant](dtype, head_dim, kv_len, **options)


def _bf16_truncates() -> bool:
    # Triton's CPU interpreter (3.x) converts fp32 to bf16 by dropping the low 16 bits (round
    # toward zero, measured: 1 + 2^-8 + 2^-10 -> 1.0), a full ulp 2^-7 instead of half of one.
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def error_model(dtype: torch.dtype, head_dim: int, kv_len: int, *, input_precision: str = "ieee",
                score_dtype: torch.dtype = torch.float32, bf16_rounding: str | None = None) -> ErrorModel:
    """Unit roundoffs of an exact kernel's steps; the derivation is in ``exact_tolerance``.

    ``bf16_rounding``: "nearest" (GPUs) or "truncate" (Triton's interpreter); None: "truncate"
    when TRITON_INTERPRET is set, else "nearest".
    """
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"dtype must be one of {tuple(UNIT_ROUNDOFF)}, got {dtype}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    if bf16_rounding not in (None, "nearest", "truncate"):
        raise ValueError(f"bf16_rounding must be None, 'nearest' or 'truncate', got {bf16_rounding!r}")
    truncate = _bf16_truncates() if bf16_rounding is None else bf16_rounding == "truncate"
    roundoff = dict(UNIT_ROUNDOFF)
    if truncate:
        roundoff[torch.bfloat16] = 2 * UNIT_ROUNDOFF[torch.bfloat16]
    u = roundoff[dtype]
    u_acc = UNIT_ROUNDOFF[torch.float64] if dtype == torch.float64 else UNIT_ROUNDOFF[torch.float32]
    tf32 = input_precision == "tf32" and dtype == torch.float32
    # A lower score_dtype: q*scale (or q and k by sqrt(scale), as torch's math SDPA does) and the
    # scores rounded to it, three roundings at most.
    score = (head_dim + 4) * u_acc + 3 * max(0.0, roundoff[score_dtype] - u_acc) + (2 * TF32_ROUNDOFF if tf32 else 0)
    pv = 2 * TF32_ROUNDOFF if tf32 else u
    return ErrorModel(score=score, pv=pv, accumulate=(3 * kv_len + 4) * u_acc, out=u,
                      subnormal=FP16_SUBNORMAL_ERROR if dtype == torch.float16 else 0.0,
                      out_floor=FP16_SUBNORMAL_ERROR if dtype == torch.float16 else FP32_UNDERFLOW_ERROR)


@register_tolerance("exact")
def exact_tolerance(dtype: torch.dtype, head_dim: int, kv_len: int | None = None, *,
                    logit_bound: float | None = None, value_bound: float = 1.0, input_precision: str = "ieee",
                    score_dtype: torch.dtype = torch.float32, bf16_rounding: str | None = None) -> Tolerance:
    """Allowed error of exact attention o = sum_j p_j v_j, p = softmax(s), s_j = scale q.k_j + m_j.

    The inputs are already rounded to ``dtype`` and the reference computes on those same values
    in float64, so only the kernel's own arithmetic counts. The model is a FlashAttention-style
    kernel: scores accumulated in fp32, softmax in fp32, probabilities rounded to the input dtype
    for the PV product, fp32 accumulators, the output rounded once to the dtype. With u the unit
    roundoff of the dtype (fp32 2^-24, fp16 2^-11, bf16 2^-8: 8 significand bits) and u32 = 2^-24:

    1. Scores. Products of fp16 (11 bits) or bf16 (8 bits) numbers are exact in fp32 (<= 24
       bits); a sum of D of them in fp32 errs by at most gamma_D = D u32 times sum_i |q_i k_i|
       (Higham, Accuracy and Stability of Numerical Algorithms, section 3.1); the scale, the mask
       add, the log2(e) factor and the max subtraction add 4 roundings: |ds_j| <= Delta_j =
       u_s A_j with A_j = scale sum_i |q_i||k_ji| + |m_j| and u_s = (D + 4) u32. A kernel that
       rounds the scaled q and k or the scores to a lower ``score_dtype`` (torch's math SDPA
       does all three) adds 3 u of that dtype; fp32 dots with ``input_precision="tf32"`` round
       q and k to 10-bit significands: + 2 * 2^-11.
    2. Softmax. For any |ds_j| <= Delta_j, p'_j lies in [sigma(s_j - Delta_j - LSE_k!=j(s_k +
       Delta_k)), sigma(s_j + Delta_j - LSE_k!=j(s_k - Delta_k))] (sigma the logistic
       function), and since sum_j (p'_j - p_j) = 0, |do_d| <= sum_j w_j |v_jd| with w_j the
       distance from p_j to the ends of its interval. Not linearised: it stays small for huge
       but well separated logits (one-hot rows) and is 0 for a single attended key. From the
       sizes alone, w_j <= p_j (exp(2 Delta) - 1), Delta = u_s * logit_bound.
    3. The PV product rounds each probability to the dtype: <= u sum_j p_j |v_jd| (2 * 2^-11 for
       tf32, which rounds v too). fp16 probabilities below 2^-14 are subnormal: 2^-25 absolute
       each, <= 2^-25 sum_j |v_jd| (the row max has weight 1 before normalising).
    4. fp32 accumulation over L keys (PV sum, normaliser, a rescale per block, the division):
       <= (3L + 4) u32 sum_j p_j |v_jd|.
    5. Rounding the output to the dtype: u |o|, the ``rtol``.
    6. Underflow: an fp32 weight e^(s_j - max) below 2^-126 may be flushed to 0 (2^-126 absolute each,
       times |v_jd|), and an output below the dtype's normal range rounds with an absolute error of
       2^-126 (fp32, bf16: flush to zero) or 2^-25 (fp16 subnormals). Found by an fp32 problem with
       logits of ~1250 whose float64 output element was 1e-68: no fp32 kernel can return it.

    Triton's CPU interpreter truncates fp32 to bf16 (see ``error_model``): u = 2^-7 for bf16 there.

    These are worst-case (not probabilistic) bounds: a correct kernel cannot fail them, and the
    faults kvpass plants (a skipped key, an ignored mask, a scale off by 5 %) exceed them by 10x
    or more. Without data (this function): atol = value_bound * (exp(2 u_s S) - 1 + u_pv +
    (3L + 4) u32 [+ L 2^-25 for fp16]) with S = ``logit_bound`` (default sqrt(D) + 4: for unit
    normal q and k, scale sum_i |q_i k_i| has mean (2/pi) sqrt(D) and standard deviation 0.77)
    and L = ``kv_len`` (default 8192). For unit-normal data with max|v| = 4, D = 128,
    L = 1024 this gives atol 1.7e-3 (fp32: the D u32 and 3L u32 worst-case terms), 3.8e-3 (fp16),
    1.7e-2 (bf16); ``tolerance_for(problem)`` is 4-6x tighter on the same data (2.8e-4, 7.5e-4,
    3.9e-3 at the largest element).
    """
    kv_len = 8192 if kv_len is None else kv_len
    logit_bound = math.sqrt(head_dim) + 4.0 if logit_bound is None else logit_bound
    em = error_model(dtype, head_dim, kv_len, input_precision=input_precision, score_dtype=score_dtype,
                     bf16_rounding=bf16_rounding)
    spread = math.expm1(min(2.0 * em.score * logit_bound, 700.0))
    atol = value_bound * (spread + em.pv + em.accumulate + kv_len * (em.subnormal + em.underflow)) + em.out_floor
    why = (f"exact attention, {dtype}, D={head_dim}, L={kv_len}: score rel. error {em.score:.2g} x "
           f"logit bound {logit_bound:.3g}, p rounding {em.pv:.2g}, fp32 accumulation {em.accumulate:.2g}, "
           f"times max|v| {value_bound:.3g} (kvpass.testing.tolerance.exact_tolerance)")
    return Tolerance(atol=atol, rtol=em.out, why=why)


def tolerance_for(problem: AttentionProblem, variant: str = "exact", *, scores: torch.Tensor | None = None,
                  **options) -> Tolerance:
    """The allowed error for one problem: per element and from its data for "exact" (the bound of
    ``exact_tolerance`` with the problem's own logits, weights and values); for other variants
    the registered model at the problem's dtype, head dim and KV length. ``scores``: the problem's
    ``reference_scores`` when the caller has them already (saves a float64 matmul)."""
    if variant != "exact":
        return attention_tolerance(problem.dtype, problem.head_dim, problem.kv_len, variant, **options)
    em = error_model(problem.dtype, problem.head_dim, problem.kv_len, **options)
    p = problem
    s = reference_scores(p.q, p.k, p.attn_mask, p.is_causal, p.scale) if scores is None else scores
    probs = safe_softmax(s)
    bias = logit_bias(p.attn_mask, p.is_causal, p.q_len, p.kv_len, p.q.device)
    finite_bias = torch.where(torch.isfinite(bias), bias.abs(), torch.zeros_like(bias))
    magnitude = p.softmax_scale * grouped_matmul(p.q.to(F64).abs(), p.k.to(F64).abs().transpose(-1, -2))
    delta = torch.where(torch.isfinite(s), em.score * (magnitude + finite_bias), torch.zeros_like(s))
    # Points 2-4 are all sums over keys of a weight times |v_jd|: one matmul.
    weights = _weight_spread(s, delta, probs) + (em.pv + em.accumulate) * probs
    weights = weights + (em.subnormal + em.underflow) * torch.isfinite(s).to(F64)
    atol = grouped_matmul(weights, p.v.to(F64).abs()) + em.out_floor
    why = (f"exact attention, {p.dtype}, D={p.head_dim}, L={p.kv_len}: per element from the data; "
           f"score rel. error {em.score:.2g} x scale sum|q||k| (max {magnitude.max().item():.3g}), "
           f"p rounding {em.pv:.2g}, fp32 accumulation {em.accumulate:.2g}, output rounding {em.out:.2g} "
           f"(kvpass.testing.tolerance.exact_tolerance)")
    return Tolerance(atol=atol, rtol=em.out, why=why)


def _lse_of_others(a: torch.Tensor) -> torch.Tensor:
    """LSE over k != j of a[..., k], for every j (float64, last dim)."""
    top = a.amax(-1, keepdim=True)
    top = torch.where(top == -math.inf, torch.zeros_like(top), top)
    e = torch.exp(a - top)
    # For j other than the argmax, total - e_j >= e_argmax = 1: no cancellation. The argmax's own
    # entry is recomputed with it left out.
    others = torch.log((e.sum(-1, keepdim=True) - e).clamp_min(0.0)) + top
    arg = a.argmax(-1, keepdim=True)
    without = torch.logsumexp(a.scatter(-1, arg, -math.inf), -1, keepdim=True)
    return others.scatter(-1, arg, without)


def _weight_spread(s: torch.Tensor, delta: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """w_j: how far p_j can move when each score moves by at most delta_j (point 2 above)."""
    hi = torch.sigmoid(s + delta - _lse_of_others(s - delta))
    lo = torch.sigmoid(s - delta - _lse_of_others(s + delta))
    spread = torch.maximum(hi - probs, probs - lo).clamp_min(0.0)
    return torch.where(torch.isfinite(s), spread, torch.zeros_like(spread))  # -inf keys: weight 0
