"""Cache formats: what one attention site keeps in its packed cache and how it attends over it.

A format combines a storage scheme (``kv_bits``, ``lowering.storage``) with a token policy (which
tokens are kept: ``policy``/``budget``) and early exit. Formats are registered per policy with
:func:`register_format`; ``build_format`` turns the spec the backend puts in the graph (a JSON string,
a constant of the op) into a format object, once per distinct spec.

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

from lowering.packed import Layout
from lowering.storage import State, StorageScheme, scheme_for


@dataclass(frozen=True)
class FormatSpec:
    kv_bits: int | str = 16
    policy: str = "full"
    budget: int | None = None
    early_exit: float | None = None

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


from lowering.formats import adore, asl, dense, h2o, snapkv, streaming  # noqa: E402,F401
