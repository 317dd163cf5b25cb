"""Checks with informative failures: poisoned buffers, closeness to the reference, the one-call
``check_kernel``. NaN and inf never pass: a comparison that meets one fails."""
from __future__ import annotations

import math
from typing import Callable

import torch

from kvpass.testing.oracles import F64, grouped_matmul, reference_scores, safe_softmax
from kvpass.testing.problems import AttentionProblem
from kvpass.testing.tolerance import Tolerance, tolerance_for

_SHOWN = 5  # offending positions listed in a message


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor like ``t`` filled with a value no kernel should leave: NaN for floats, the most
    negative value for signed integers (the largest for unsigned), so an element the kernel
    forgot fails ``assert_all_written``."""
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return torch.full_like(t, math.nan)
    return torch.full_like(t, _int_poison(t.dtype))


def _int_poison(dtype: torch.dtype) -> int:
    if dtype == torch.bool:
        raise TypeError("bool tensors have no poison value")
    info = torch.iinfo(dtype)
    return info.min if info.min < 0 else info.max


def _positions(flags: torch.Tensor) -> str:
    idx = flags.nonzero()[:_SHOWN].tolist()
    more = int(flags.sum()) - len(idx)
    return ", ".join(str(tuple(i)) for i in idx) + (f" and {more} more" if more > 0 else "")


def assert_all_written(out: torch.Tensor, name: str = "output") -> None:
    """Fail if ``out`` still holds the poison of ``poisoned_like`` (or any NaN/inf) anywhere."""
    if out.dtype.is_floating_point:
        bad = ~torch.isfinite(out.float() if out.element_size() == 1 else out)  # float8: no isfinite kernel
        what = "NaN/inf (unwritten, since poisoned_like fills NaN, or computed)"
    else:
        bad = out == _int_poison(out.dtype)
        what = "the poison value (unwritten)"
    if bad.any():
        raise AssertionError(f"{name} {list(out.shape)} {out.dtype}: {int(bad.sum())} of {out.numel()} elements "
                             f"hold {what}, at {_positions(bad.cpu())}")


def assert_attention_close(out: torch.Tensor, ref: torch.Tensor, tolerance: Tolerance, *,
                           context: str = "") -> None:
    """Fail unless ``out`` is finite and within ``tolerance`` of the float64 ``ref``.

    The message gives the shape and dtype, how many elements fail, the largest absolute and
    relative errors and where they are, the worst error/allowed ratio, and ``tolerance.why``.
    """
    head = f"{context}\n" if context else ""
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"{head}shape {list(out.shape)} != reference {list(ref.shape)}")
    out64 = out.detach().to(device=ref.device, dtype=F64)
    nonfinite = ~torch.isfinite(out64)
    if nonfinite.any():
        raise AssertionError(f"{head}output {list(out.shape)} {out.dtype}: {int(nonfinite.sum())} of "
                             f"{out.numel()} elements are NaN/inf, at {_positions(nonfinite.cpu())}")
    err = (out64 - ref).abs()
    if tolerance.metric == "sqnr_db":
        noise = err.square().sum().item()
        sqnr = math.inf if noise == 0 else 10 * math.log10(ref.square().sum().item() / noise)
        if not sqnr >= tolerance.min_sqnr_db:
            raise AssertionError(f"{head}output {list(out.shape)} {out.dtype}: SQNR {sqnr:.2f} dB < "
                                 f"{tolerance.min_sqnr_db} dB (max abs error {err.max().item():.3g})\n"
                                 f"tolerance: {tolerance.why}")
        return
    allowed = torch.as_tensor(tolerance.allowed(ref), dtype=F64, device=ref.device).expand_as(ref)
    bad = ~(err <= allowed)
    if not bad.any():
        return
    worst = _where_max(err)
    ratio = err / allowed.clamp_min(torch.finfo(F64).tiny)
    worst_ratio = _where_max(ratio)
    rows = bad.flatten(0, -2).any(-1) if bad.dim() > 1 else bad
    lines = [
        f"{head}output {list(out.shape)} {out.dtype} vs float64 reference: {int(bad.sum())} of {out.numel()} "
        f"elements ({int(rows.sum())} of {rows.numel()} rows) exceed the tolerance, at {_positions(bad.cpu())}",
        f"max abs error {err[worst].item():.3g} at {worst}: got {out64[worst].item():.6g}, expected "
        f"{ref[worst].item():.6g}, allowed {allowed[worst].item():.3g} "
        f"(max relative error {(err / ref.abs()).nan_to_num(0.0, posinf=math.inf).max().item():.3g})",
        f"worst error/allowed {ratio[worst_ratio].item():.3g} at {worst_ratio}",
        f"tolerance: {tolerance.why or tolerance}",
    ]
    raise AssertionError("\n".join(lines))


def _where_max(t: torch.Tensor) -> tuple[int, ...]:
    flat = int(t.flatten().argmax())
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), t.shape))


def check_kernel(fn: Callable, problem: AttentionProblem, *, variant: str = "exact",
                 reference: torch.Tensor | None = None, tolerance: Tolerance | None = None, device=None,
                 out_arg: bool = False, **tolerance_options) -> torch.Tensor:
    """Run ``fn(q, k, v, attn_mask=..., scale=..., is_causal=...)`` on ``problem`` and check it.

    Checks, in order: ``fn`` left its inputs unchanged; the output has q's shape and dtype; every
    element is written and finite; it is within ``tolerance`` (default: ``tolerance_for(problem,
    variant, **tolerance_options)``) of ``reference`` (default: the float64 ``reference_attention``).
    ``device``: move the problem there first. ``out_arg``: also pass ``out=`` a NaN-poisoned buffer
    and check the kernel wrote all of it. Returns the output.
    """
    if device is not None:
        problem = problem.to(device)
    p = problem
    inputs = {"q": p.q, "k": p.k, "v": p.v, "attn_mask": p.attn_mask}
    before = {name: t.clone() for name, t in inputs.items() if t is not None}
    kwargs = p.kwargs()
    out_buffer = None
    if out_arg:
        out_buffer = poisoned_like(torch.empty(p.q.shape, dtype=p.dtype, device=p.q.device))
        kwargs["out"] = out_buffer
    result = fn(p.q, p.k, p.v, **kwargs)
    context = f"kernel {getattr(fn, '__name__', fn)!s} on {problem!r}"
    out = out_buffer if out_arg and result is None else result
    if out_arg and out is not out_buffer and out.data_ptr() != out_buffer.data_ptr():
        raise AssertionError(f"{context}\nout= was given but the kernel returned another tensor")
    for name, t in before.items():
        if not torch.equal(inputs[name], t):
            raise AssertionError(f"{context}\nthe kernel modified its input {name}")
    if not isinstance(out, torch.Tensor):
        raise AssertionError(f"{context}\nreturned {type(out).__name__}, not a tensor")
    if tuple(out.shape) != tuple(p.q.shape) or out.dtype != p.dtype:
        raise AssertionError(f"{context}\nreturned {list(out.shape)} {out.dtype}, expected "
                             f"{list(p.q.shape)} {p.dtype}")
    try:
        assert_all_written(out)
    except AssertionError as e:
        raise AssertionError(f"{context}\n{e}") from None
    scores = reference_scores(p.q, p.k, p.attn_mask, p.is_causal, p.scale)
    ref = grouped_matmul(safe_softmax(scores), p.v.to(F64)) if reference is None else reference
    if tolerance is None:
        extra = {"scores": scores} if variant == "exact" else {}
        tolerance = tolerance_for(p, variant, **extra, **tolerance_options)
    assert_attention_close(out, ref, tolerance, context=context)
    return out
