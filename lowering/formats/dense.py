"""policy="full": every token kept, in the storage scheme's form.

Prefill-length queries attend over the dequantized old tokens plus the new ones at full precision
(prefill is compute-bound and dequantizes once, as KIVI does); decode-length queries go to the
scheme's fused decode attention over the packed cache, which then includes the new tokens.

With ``early_exit`` (``lowering.attention.early_exit``) the buffer also holds per-block key bounds and value
norms, updated on every append, and decode attention stops reading blocks once the rest cannot
change the output by more than the tolerance. 16-bit storage feeds the Triton kernel (CUDA) or its
torch reference (elsewhere) straight from the packed sections; other schemes dequantize the layer
first and run the same bounded attention over it (no fused quantized early-exit kernel yet).
"""
from __future__ import annotations

import torch

from lowering.attention.early_exit import bound
from lowering.core.limits import MAX_DECODE_QUERY_LEN
from lowering.core.reference import exact_attention
from lowering.formats import FormatSpec, early_exit, launch, register_format
from lowering.storage import State, StorageScheme


@register_format("full")
class Dense:
    def __init__(self, spec: FormatSpec, storage: StorageScheme):
        self.spec, self.storage = spec, storage
        self.tolerance = early_exit.resolve_tolerance(spec.early_exit)
        # Appends go into the buffer's spare capacity (``lowering.core.packed``); early exit's block summaries
        # are rewritten per step and its kernel reads them densely, so that form copies.
        self.grows_in_place = self.tolerance is None

    def layout(self, batch, kv_heads, length, k_dim, v_dim, dtype):
        layout = self.storage.layout(batch, kv_heads, length, k_dim, v_dim, dtype)
        if self.tolerance is None:
            return layout
        summaries = bound.summary_layout(batch, kv_heads, length, k_dim, dtype)
        clash = set(layout) & set(summaries)
        if clash:
            raise ValueError(f"storage scheme {self.storage.name!r} uses the early-exit section names {sorted(clash)}")
        return {**layout, **summaries}

    def step(self, q, old: State | None, old_length: int, new_k, new_v, attn_mask, is_causal, scale, site: str,
             out: State) -> torch.Tensor:
        if self.tolerance is None:
            launch.append(self.storage, old, old_length, new_k, new_v, out)
        else:
            launch.append(self.storage, _scheme_part(old), old_length, new_k, new_v, _scheme_part(out))
        length = old_length + new_k.shape[2]
        gqa = q.shape[1] != new_k.shape[1]
        full_precision = str(self.spec.kv_bits) == "16"
        layer = None  # this layer's keys and values as attention sees them, when early exit needs them
        if self.tolerance is not None:
            start = old_length
            if full_precision:
                summarised = new_k, new_v
            else:  # summarise what attention will read: the dequantized new tokens
                layer = self.storage.dequantize(_scheme_part(out), length, q.dtype)
                # A grouped scheme (int4) quantizes its open group's earlier rows, until now read at full
                # precision, once the group fills: summarise them again as codes, merged with what their
                # block held (min / max merge, so the summaries contain both forms).
                start = restored_from(self.storage, old_length)
                summarised = layer[0][:, :, start:], layer[1][:, :, start:]
            bound.update_summaries(_summary_part(old), start, *summarised, _summary_part(out))
        # SDPA's is_causal aligns the query block top-left (with a longer cache, a 1-token query sees only
        # key 0); HF passes an explicit mask whenever there is a past. Follow SDPA exactly on that path.
        if q.shape[2] > MAX_DECODE_QUERY_LEN or is_causal:
            k, v = new_k, new_v
            if old is not None:
                old_k, old_v = self.storage.dequantize(_scheme_part(old), old_length, q.dtype)
                k, v = torch.cat([old_k, new_k], dim=2), torch.cat([old_v, new_v], dim=2)
            return exact_attention(q, k, v, attn_mask, is_causal, scale, gqa)
        if self.tolerance is None:
            return launch.decode_attention(self.storage, q, out, length, attn_mask, scale)
        k, v = (out["k"], out["v"]) if full_precision else layer
        return early_exit.attend_and_count(q, k, v, out, attn_mask, scale, self.tolerance, site)

    def decode_in_place(self, q, sections, old_length: int, new_k, new_v, attn_mask, scale):
        """The storage scheme's fused decode step on capacity ``sections`` (``lowering.formats.cache_step``), or
        None (``lowering.formats.launch.decode_in_place``)."""
        if self.tolerance is not None:
            return None
        return launch.decode_in_place(self.storage, q, sections, old_length, new_k, new_v, attn_mask, scale)


def restored_from(storage: StorageScheme, old_length: int) -> int:
    """The first token whose stored form an append at ``old_length`` may change: the open group's first for a
    scheme quantizing in groups of tokens (``group``), else ``old_length``."""
    group = getattr(storage, "group", None)
    return old_length - old_length % group if group else old_length


def _scheme_part(state: State | None) -> State | None:
    """The storage scheme's own sections (schemes may iterate over every section they are given)."""
    return None if state is None else {n: t for n, t in state.items() if n not in bound.SECTIONS}


def _summary_part(state: State | None) -> State | None:
    return None if state is None else {n: state[n] for n in bound.SECTIONS}
