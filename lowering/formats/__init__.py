"""Cache formats: what one attention site keeps in its packed cache and how it attends over it.

A format combines a storage scheme (``kv_bits``, ``lowering.storage``) with a token policy (which
tokens are kept: ``policy``/``budget``) and early exit. Formats are registered per policy with
:func:`register_format`; ``build_format`` turns the spec the backend puts in the graph (a JSON string,
a constant of the op) into a format object, once per distinct spec; ``cache_step`` runs one layer's
step on the packed slots, the body of ``torch.ops.kvpass.cache_attention``.

A format implements :class:`CacheFormat`. ``layout`` must be a pure function of host-known sizes
(use ``torch.sym_min``/``sym_max``, not ``min``/``max``, on lengths: the op's fake implementation calls
it with symbolic L).
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import torch

from lowering.core.packed import Layout
from lowering.storage import State, StorageScheme, scheme_for


@dataclass(frozen=True)
class FormatSpec:
    """What a site's cache is: the backend's options that shape it (``kvpass.options``), as a constant of the op.

    ``fused_scoring``: budgeted decode steps score and attend with the fused Triton kernels
    (``lowering.attention.scored``; policies with ``fused_scoring``). ``replace_in_place``: full hot sets of
    ``replaces_in_place`` policies decode in place (``lowering/formats/slot_replacement.py``). None = on CUDA;
    True also runs the kernels on the CPU under ``TRITON_INTERPRET=1`` (tests), False the reference paths.
    ``asl_layers``: ASL's (first layer, span) (``lowering/formats/asl.py``); None: the paper's (10, 8).
    ``adore_lazy_cold_rows``: ADORE's decode steps convert only the cold rows they rebuild (False: every cold
    row, each step; the same result, O(L) work: the tests compare the two).
    """

    kv_bits: int | str = 16
    policy: str = "full"
    budget: int | None = None
    early_exit: float | None = None
    fused_scoring: bool | None = None
    replace_in_place: bool | None = None
    asl_layers: tuple[int, int] | None = None
    adore_lazy_cold_rows: bool = True

    def __post_init__(self):
        if self.asl_layers is not None:  # JSON gives a list back
            object.__setattr__(self, "asl_layers", tuple(self.asl_layers))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class CacheFormat(Protocol):
    spec: FormatSpec
    storage: StorageScheme

    def layout(self, batch: int, kv_heads: int, length: int, k_dim: int, v_dim: int, dtype: torch.dtype) -> Layout:
        """Sections of the buffer after ``length`` tokens (logical: the model's sequence length)."""

    def step(self, q: torch.Tensor, old: State | None, old_length: int, new_k: torch.Tensor, new_v: torch.Tensor,
             attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None, site: str,
             out: State) -> torch.Tensor:
        """One forward of the layer: write old + new tokens into ``out`` (sections of
        ``layout(..., old_length + n, ...)``) and return the attention of q [B, Hq, Lq, Dk] over all
        ``old_length + n`` tokens under the model's ``attn_mask`` ([B or 1, 1 or Hq, Lq, old_length + n]
        over logical positions) -> [B, Hq, Lq, Dv]."""

    # Optional, found by ``getattr`` in ``cache_step``: ``grows_in_place`` (bool: the layout's sections only grow
    # at the end, so appends go into a capacity buffer), ``decode_in_place(q, sections, old_length, new_k, new_v,
    # attn_mask, scale)`` and ``decode_replacing(q, state, old_length, new_k, new_v, attn_mask, is_causal, scale,
    # site)``: fast decode steps returning the output, or None where the general ``step`` must run.


FORMATS: dict[str, Callable[[FormatSpec, StorageScheme], CacheFormat]] = {}


def register_format(policy: str):
    def decorate(cls):
        if policy in FORMATS:
            raise ValueError(f"cache format for policy {policy!r} registered twice")
        FORMATS[policy] = cls
        return cls

    return decorate


@functools.lru_cache(maxsize=None)
def build_format(spec_json: str) -> CacheFormat:
    spec = FormatSpec(**json.loads(spec_json))
    if spec.policy not in FORMATS:
        raise NotImplementedError(f"no cache format for policy {spec.policy!r}; have {sorted(FORMATS)}")
    return FORMATS[spec.policy](spec, scheme_for(spec.kv_bits))


from lowering.formats import adore, asl, dense, h2o, snapkv, streaming  # noqa: E402,F401,I001  (registers them)
