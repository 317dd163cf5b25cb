"""Where storage operands meet attention launchers: a scheme's appends and decode attention, on its fused
kernels where they take the inputs (CUDA; the CPU under ``TRITON_INTERPRET=1`` for tests) and on torch
references elsewhere.

Schemes (``lowering.storage``) say what their kernels read (``kernel_operands``, ``append_operands``) and
never launch anything; the formats call the functions here instead of a scheme's own torch path:

- ``append``: int8's quantize-on-append kernel on CUDA (``lowering/attention/append``), else ``scheme.append``;
- ``int8_rows``: rows as int8 codes and scales (ADORE's cold store), by the same kernel on CUDA;
- ``decode_attention``: 16-bit caches through exact attention (the split-KV kernel on CUDA, torch's SDPA
  elsewhere); packed caches through the split-KV kernel with the scheme's ``KV_FORMAT``
  (``lowering/attention/decode``), which dequantizes tiles in registers, or off CUDA (or for inputs the
  kernel refuses) by dequantizing this layer and calling SDPA; schemes with no kernel (int4's per-token
  rows) by the latter always;
- ``decode_in_place``: a decode step appended into capacity sections and attended in two launches;
- ``append_at``: int8's append kernel writing at device positions (a fixed-capacity cache), one launch per
  tensor;
- ``group_mask``: int4's decode mask over a fixed capacity, one launch on CUDA;
- ``int4_decode_write``: one decode token at a device position into int4 sections of a fixed capacity, one
  launch on CUDA (``lowering/attention/append/int4_kernel.py``).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from lowering.attention import exact, launchers
from lowering.attention.compile_failure import KernelCompileError, is_compile_failure, summary
from lowering.core.operands import AppendOperands, KeySegment, SlotRule
from lowering.core.reference import exact_attention
from lowering.core.stats import calls
from lowering.storage import State, StorageScheme, token_blocks
from lowering.storage.full import FullPrecision
from lowering.storage.int4 import Int4Kivi
from lowering.storage.int8 import QMAX, Int8, quantize_rows

log = logging.getLogger("kvpass.lowering")


def _append_kernel_takes(x: torch.Tensor, target: AppendOperands) -> bool:
    if launchers.missing() is not None:
        return False
    return launchers.load().append.unsupported_reason(x, target.codes) is None


def _append_by_kernel(x: torch.Tensor, target: AppendOperands, start: int | torch.Tensor) -> None:
    launchers.load().append.append_rows(x, target.codes, target.scales, start, target.qmax, target.rotated,
                                        target.blocked)


def append(scheme: StorageScheme, old: State | None, old_length: int, new_k, new_v, out: State) -> None:
    """``scheme.append``, with the new rows quantized by the fused kernel where the scheme has one (int8 on CUDA)."""
    if not (getattr(scheme, "fused_append", False) and new_k.is_cuda):
        scheme.append(old, old_length, new_k, new_v, out)
        return
    scheme.copy_old(old, old_length, out)
    for name, x in (("k", new_k), ("v", new_v)):
        target = scheme.append_operands(name, x, out)
        if _append_kernel_takes(x, target):
            _append_by_kernel(x, target, old_length)
        else:
            scheme.write_rows(name, x, out, old_length)


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [B, H, n, D] as int8 codes [B, H, n, D] and fp32 scales [B, H, n], unrotated
    (``lowering.storage.int8.quantize_rows``' rule and bits): ADORE's cold-store form. On CUDA by the append kernel,
    one launch (``int8_rows_by_kernel``), else by torch ops."""
    if x.is_cuda:
        out = int8_rows_by_kernel(x)
        if out is not None:
            return out
    codes, scales = quantize_rows(x)
    return codes.to(torch.int8), scales


def int8_rows_by_kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``int8_rows`` by the append kernel writing rows 0 .. n - 1 of fresh sections; None where it does not take x."""
    target = AppendOperands(torch.empty(x.shape, dtype=torch.int8, device=x.device),
                            torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device), QMAX, False, False)
    if not _append_kernel_takes(x, target):
        return None
    _append_by_kernel(x, target, 0)
    return target.codes, target.scales


def compiled_or_none(what: str, launch_kernel):
    """``launch_kernel()``'s result, or None where its kernel failed to compile for these constants (counted in
    ``lowering.core.stats.calls`` under ``what``): the caller then takes its torch path. Other errors propagate."""
    try:
        return launch_kernel()
    except Exception as error:
        if not is_compile_failure(error):
            raise
        calls[f"{what}: kernel failed to compile ({summary(error)}); torch path"] += 1
        log.warning("%s: kernel failed to compile (%s); torch path", what, summary(error))
        return None


def _append_targets(scheme: StorageScheme, new_k, new_v, sections: State):
    """[(rows, AppendOperands)] of keys and values where the fused append kernel takes both (a scheme with
    ``fused_append``), else None."""
    if not getattr(scheme, "fused_append", False):
        return None
    targets = [(x, scheme.append_operands(name, x, sections)) for name, x in (("k", new_k), ("v", new_v))]
    return targets if all(_append_kernel_takes(x, target) for x, target in targets) else None


def _append_both(targets, start: int | torch.Tensor) -> bool:
    for x, target in targets:
        _append_by_kernel(x, target, start)
    return True


def append_at(scheme: StorageScheme, positions: torch.Tensor, new_k, new_v, sections: State) -> bool:
    """Whether the fused quantize-on-append kernel wrote new_k, new_v [B, Hkv, n, D] at the device positions
    ``positions`` (consecutive, int64 [n]) into per-token ``sections`` of a fixed capacity (int8 and fp8 on CUDA,
    inputs it takes; False: nothing written, or the kernel failed to compile: a failure after the keys were
    written is harmless, the caller's torch path writes both). One launch per tensor, the first position read on
    the device."""
    targets = _append_targets(scheme, new_k, new_v, sections) if new_k.is_cuda else None
    return targets is not None and compiled_or_none("append at device positions",
                                                    lambda: _append_both(targets, positions)) is not None


def int4_decode_write(scheme: StorageScheme, positions: torch.Tensor, new_k, new_v, sections: State) -> bool:
    """Whether the fused kernel wrote the decode token new_k, new_v [B, Hkv, 1, D] at ``positions[0]`` into
    int4 KIVI ``sections`` of a fixed capacity (CUDA, inputs it takes; False: nothing written or the kernel failed
    to compile, the caller's torch path writes). Stores what that path stores at every position attention reads."""
    if not (isinstance(scheme, Int4Kivi) and new_k.is_cuda) or launchers.missing() is not None:
        return False
    append = launchers.load().append
    if append.int4_decode_unsupported_reason(new_k, sections) is not None:
        return False
    slots = token_blocks.slot_index(scheme.VALUE_SLOTS, new_k.device)

    def write() -> bool:
        append.append_int4_decode(positions, new_k, new_v, sections, slots, scheme.group, token_blocks.TOKENS)
        return True

    return compiled_or_none("int4 decode write", write) is not None


def slot_replace(state: State, slots: State, rows: State, positions: torch.Tensor, mask: torch.Tensor, q_heads: int,
                 q_len: int, never: float, rule: SlotRule,
                 weights_of: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
    """A budgeted policy's one-token decode step on a fixed cache's budget ``slots`` (the row sections of ``state``)
    by the fused kernel (CUDA, inputs it takes; ``lowering/attention/slots``): scores, the dropped slot, the new
    token's rows, position and score written in place as ``fixed_budgeted.choose_and_write`` writes them; returns
    the mask over the slots after the step (``fixed_budgeted.kept_mask``'s). ``weights_of`` (a rule that
    accumulates, H2O): computes the step's weights [B, Hkv, budget + 1], called only when the kernel runs. None:
    nothing written, the torch path runs (a compile failure counted as the others are)."""
    if not mask.is_cuda or launchers.missing() is not None:
        return None
    kernels = launchers.load().slots
    if kernels.unsupported_reason(slots, rows, state["pos"], state["score"], mask) is not None:
        return None
    weights = weights_of() if rule.accumulates else None
    return compiled_or_none("slot replacement decode step", lambda: kernels.replace_step(
        state["pos"], state["score"], positions, mask, slots, rows, q_heads, q_len, never, rule, weights))


def candidate_weights(q: torch.Tensor, segments: list[KeySegment], mask: torch.Tensor, scale: float, *,
                      mean: bool = False) -> torch.Tensor | None:
    """Weights each candidate key receives from q [B, Hq, Lq, D] (summed over its KV head's query rows, or their
    mean), fp32 [B, Hkv, C], by the fused scoring kernel in one pass over the column ``segments`` (keys [B, Hkv, n,
    D] in q's dtype, or int8 codes with their scales) under ``mask`` [B|1, Hq|1, Lq, C] over the candidates
    themselves (bool, or additive with < -1e4 unattended); None where the kernels are missing, do not take the step
    or fail to compile (the caller's torch path)."""
    if launchers.missing() is not None:
        return None
    scored = launchers.load().scored
    columns = mask.shape[-1]
    if scored.scoring_unsupported_reason(q, segments, mask, columns) is not None:
        return None
    pos = torch.arange(columns, device=q.device).expand(q.shape[0], segments[0].k.shape[1], columns)
    found = compiled_or_none("candidate weights",
                             lambda: scored.score_keys(q, segments, pos, mask, scale, columns, mean=mean))
    return None if found is None else found.weights


def group_mask(mask: torch.Tensor, positions: torch.Tensor, group: int) -> torch.Tensor | None:
    """A grouped scheme's decode mask over a fixed capacity (``fixed_capacity.kernel_mask``'s result) in one launch
    on CUDA; None elsewhere or where the kernel fails to compile (the caller's torch twin builds it)."""
    if not mask.is_cuda or launchers.missing() is not None:
        return None
    return compiled_or_none("int4 decode mask", lambda: launchers.load().decode.group_mask(mask, positions, group))


def kernel_unsupported_reason(q: torch.Tensor, state: dict, length: int, attn_mask, scheme=None) -> str | None:
    """None when the fused kernel takes this query over a packed state of ``length`` tokens (and ``scheme``'s
    own ``kernel_refusal``, where it has one, does not refuse it)."""
    if not q.is_cuda and q.device.type != "cpu":
        return f"device {q.device.type}"
    missing = launchers.missing()
    if missing is not None:
        return missing
    codes = state["k"]
    if state["v"].shape[3] != codes.shape[3]:  # dim 3: channels (or bytes) also of token-blocked values
        return "keys and values have different head dims"
    refusal = getattr(scheme, "kernel_refusal", None)
    reason = None if refusal is None else refusal(q)
    if reason is not None:
        return reason
    return launchers.load().decode.query_unsupported_reason(q, codes.shape[1], length, attn_mask)


def kernel_decode_attention(scheme, q: torch.Tensor, state: dict, length: int, attn_mask=None, scale=None, *,
                            out=None, config=None, **options) -> torch.Tensor:
    """The fused kernel: q [B, Hq, Lq, D] over ``length`` tokens of ``scheme``'s packed ``state`` ->
    [B, Hq, Lq, D] in q's dtype. ``options`` go to ``scheme.kernel_operands`` (aligned: ``tau``, ``stats``)."""
    reason = kernel_unsupported_reason(q, state, length, attn_mask, scheme)
    if reason is not None:
        raise ValueError(f"{scheme.name} decode kernel: {reason}")
    # A scheme storing its rows rotated says so in its operands: the kernel rotates q and turns o back.
    return launchers.load().decode.launch(q, scheme.kernel_operands(q, state, length, **options), attn_mask, scale,
                                          out=out, config=config)


def kernel_attention_or_none(scheme, q, state: State, length: int, attn_mask, scale) -> torch.Tensor | None:
    """The fused kernel's output (contiguous), or None where it refuses the inputs or fails to compile for
    them (counted in ``lowering.core.stats.calls``): the caller then takes its reference."""
    reason = kernel_unsupported_reason(q, state, length, attn_mask, scheme)
    if reason is None:
        try:
            return kernel_decode_attention(scheme, q, state, length, attn_mask, scale).contiguous()
        except KernelCompileError as error:
            reason = f"kernel failed to compile ({error})"
            calls[f"{scheme.name} decode on the reference: {reason}"] += 1
    log.debug("%s decode on the reference: %s", scheme.name, reason)
    return None


def _dequantized_attention(scheme, q, state: State, length: int, attn_mask, scale) -> torch.Tensor:
    k, v = scheme.dequantize(state, length, q.dtype)
    return exact_attention(q, k, v, attn_mask, False, scale, q.shape[1] != k.shape[1])


def decode_attention(scheme: StorageScheme, q, state: State, length: int, attn_mask, scale) -> torch.Tensor:
    """Attention of q [B, Hq, Lq, Dk] (Lq small, Hq a multiple of Hkv) over the ``length`` tokens ``scheme``
    stores in ``state``, ``attn_mask`` bool or additive broadcastable to [B, Hq, Lq, length] -> [B, Hq, Lq, Dv].
    Fused kernel on CUDA; elsewhere its host twin for schemes storing code * scale in unrotated rows
    (``attend_over_products``), else a reference that never materialises more than this layer's dequantized
    cache."""
    if isinstance(scheme, FullPrecision):
        k, v = state["k"], state["v"]
        return exact.attention(q, k, v, attn_mask, False, scale, q.shape[1] != k.shape[1], True)
    if not hasattr(scheme, "kernel_operands"):
        return _dequantized_attention(scheme, q, state, length, attn_mask, scale)
    if q.is_cuda:
        out = kernel_attention_or_none(scheme, q, state, length, attn_mask, scale)
        if out is not None:
            return out
    if getattr(scheme, "kernel_attends_over_products", False) and not scheme.rotates(q.shape[-1]):
        return attend_over_products(scheme, q, state, length, attn_mask, scale)
    return _dequantized_attention(scheme, q, state, length, attn_mask, scale)


def attend_over_products(scheme, q, state: dict, length: int, attn_mask, scale) -> torch.Tensor:
    """The host path of schemes storing code * per-token scale with unrotated rows (fp8; int8 at head dims
    that are not powers of two): q [B, Hq, Lq, D] over ``length`` tokens -> [B, Hq, Lq, D] in q's dtype,
    computed in fp32.

    As the kernel does, the key scales multiply the scores and the value scales the weights, so a decode
    step converts each cached code to fp32 once and never scales or copies the cache again. Rotated rows
    take ``dequantize`` instead: attending in the stored basis (the query rotated in, the output turned
    back) would be cheaper, but its fp32 rotations of the output differ from attention over the
    dequantized rows by more than the exact tolerance the host path is held to. A query row whose every
    key is masked gives zeros."""
    b, hq, lq, d = q.shape
    hkv = state["k_scale"].shape[1]
    query = q.float().reshape(b, hkv, hq // hkv * lq, d)  # [B, Hkv, G Lq, D]
    keys = scheme.code_values(state, "k", length)  # [B, Hkv, L, D]
    softmax_scale = d ** -0.5 if scale is None else scale
    key_scale = state["k_scale"][:, :, :length].unsqueeze(-2) * softmax_scale  # [B, Hkv, 1, L]
    scores = (query @ keys.transpose(-1, -2) * key_scale).view(b, hq, lq, length)
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool
                  else scores + attn_mask.float())
    top = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - torch.where(top == -math.inf, 0.0, top))
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    weights = weights.view(b, hkv, hq // hkv * lq, length) * state["v_scale"][:, :, :length].unsqueeze(-2)
    out = weights @ scheme.code_values(state, "v", length)  # [B, Hkv, G Lq, D]
    return out.view(b, hq, lq, d).to(q.dtype)


def decode_in_place(scheme: StorageScheme, q, sections: State, old_length: int, new_k, new_v, attn_mask,
                    scale) -> torch.Tensor | None:
    """A decode step on capacity ``sections`` (rows beyond the length allowed; the op's CUDA fast path): the
    new rows appended at ``old_length``, then the decode kernel over ``old_length + n`` rows; None where the
    scheme has no such path or a kernel refuses the inputs or fails to compile (the general path then runs).

    int8: the new rows quantized into the sections by the fused append kernel. int4: the new tokens copied
    into the residual window, unless they complete a key group (quantizing it is the general path's)."""
    length = old_length + new_k.shape[2]
    if isinstance(scheme, Int8):
        targets = _append_targets(scheme, new_k, new_v, sections)
        if targets is None or kernel_unsupported_reason(q, sections, length, attn_mask, scheme):
            return None
        _append_both(targets, old_length)
        return _launch_or_none(q, scheme.kernel_operands(q, sections, length), attn_mask, scale)
    if isinstance(scheme, Int4Kivi):
        if (not scheme.appends_to_residual(old_length, new_k.shape[2])
                or kernel_unsupported_reason(q, sections, length, attn_mask, scheme)):
            return None
        scheme.append_residual(sections, old_length, new_k, new_v)
        return _launch_or_none(q, scheme.kernel_operands(q, sections, length), attn_mask, scale)
    return None


def _launch_or_none(q, operands, attn_mask, scale) -> torch.Tensor | None:
    """The decode kernel over ``operands``, or None where it fails to compile (the general path then runs: it
    writes this step's rows again where the in-place step wrote them, so nothing is lost)."""
    try:
        return launchers.load().decode.launch(q, operands, attn_mask, scale)
    except KernelCompileError as error:
        calls[f"decode in place on the general path: kernel failed to compile ({error})"] += 1
        return None
