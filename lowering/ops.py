"""``torch.ops.kvpass.*``: the ops rewritten graphs call, registered with ``torch.library`` so Dynamo and
Inductor trace them through their fake implementations (dynamic sequence lengths included).

Registration only: each op's body is one call into the layer that implements it (exact attention:
``lowering.attention.exact``; a packed cache's step: ``lowering.formats.cache_step``; the fixed-capacity
cache's write, read and attention: ``lowering.formats.fixed_capacity``). Importing this module
registers the ops; ``kvpass.variants`` imports it, and nothing else should.
"""
from __future__ import annotations

import torch

from lowering.attention import exact
from lowering.formats import cache_step, fixed_adore, fixed_budgeted, fixed_capacity, fixed_early_exit


@torch.library.custom_op("kvpass::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              is_causal: bool, scale: float | None, enable_gqa: bool, use_kernel: bool, site: str = "") -> torch.Tensor:
    """Exact attention. q [B, Hq, Lq, D]; k, v [B, Hk, L, D] with Hk = Hq, or Hq % Hk == 0 and
    enable_gqa; attn_mask bool (True = attend) or additive, broadcastable to [B, Hq, Lq, L]; ``use_kernel``:
    the Triton decode kernel where it takes the inputs; ``site``: where k, v are the model's cache, the site's
    name (its bytes and tokens go to ``lowering.core.stats``, the figures a packed cache reports) -> [B, Hq, Lq, Dv]."""
    return exact.attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, use_kernel, site)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask, is_causal, scale, enable_gqa, use_kernel, site=""):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("kvpass::cache_attention", mutates_args=())
def cache_attention(q: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, new_k: torch.Tensor,
                    new_v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None,
                    spec: str, site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cache update and attention in one op, for variants that store the cache their own way.

    past_k, past_v: what the model's cache held (a kvpass slot, HF's empty start, or a plain full-precision
    cache, which is converted); new_k, new_v [B, Hkv, n, D]: this step's tokens; q [B, Hq, Lq, D]; spec: the
    ``FormatSpec`` as JSON; site: the attention module's path (statistics). Returns (attention output
    [B, Hq, Lq, Dv], a 1-element view of the new packed buffer, a 1-element marker buffer for the values
    slot); the graph wraps the buffers into slots and writes them back (``lowering.formats.cache_step``)."""
    return cache_step.cache_attention(q, past_k, past_v, new_k, new_v, attn_mask, is_causal, scale, spec, site)


@cache_attention.register_fake
def _cache_attention_fake(q, past_k, past_v, new_k, new_v, attn_mask, is_causal, scale, spec, site):
    return (q.new_empty((*q.shape[:-1], new_v.shape[-1])), q.new_empty(1, dtype=torch.uint8),
            q.new_empty(1, dtype=torch.uint8))


@torch.library.custom_op("kvpass::fixed_cache_write", mutates_args=("buffer",))
def fixed_cache_write(buffer: torch.Tensor, positions: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
                      spec: str) -> None:
    """Store new_k, new_v [B, Hkv, n, D] at ``positions`` (int64 [n]) of the layer's fixed buffer."""
    fixed_capacity.write(buffer, positions, new_k, new_v, fixed_capacity.parse_spec(spec))
    fixed_early_exit.update_summaries(buffer, positions, fixed_capacity.parse_spec(spec))  # with early_exit only


@fixed_cache_write.register_fake
def _fixed_cache_write_fake(buffer, positions, new_k, new_v, spec):
    return None


@torch.library.custom_op("kvpass::fixed_cache_read", mutates_args=())
def fixed_cache_read(buffer: torch.Tensor, positions: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
                     spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache as full-precision keys and values [B, Hkv, capacity, D] (``read``)."""
    return fixed_capacity.read(buffer, positions, new_k, new_v, fixed_capacity.parse_spec(spec))


@fixed_cache_read.register_fake
def _fixed_cache_read_fake(buffer, positions, new_k, new_v, spec):
    s = fixed_capacity.parse_spec(spec)
    return (new_k.new_empty((s.batch, s.kv_heads, s.capacity, s.k_dim)),
            new_v.new_empty((s.batch, s.kv_heads, s.capacity, s.v_dim)))


@torch.library.custom_op("kvpass::fixed_cache_attention", mutates_args=())
def fixed_cache_attention(q: torch.Tensor, buffer: torch.Tensor, positions: torch.Tensor, new_k: torch.Tensor,
                          new_v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None,
                          spec: str) -> torch.Tensor:
    """Attention of q [B, Hq, Lq, D] over the packed buffer, under the model's mask over the capacity."""
    return fixed_capacity.attention(q, buffer, positions, new_k, new_v, attn_mask, is_causal, scale,
                                    fixed_capacity.parse_spec(spec))


@fixed_cache_attention.register_fake
def _fixed_cache_attention_fake(q, buffer, positions, new_k, new_v, attn_mask, is_causal, scale, spec):
    return q.new_empty((*q.shape[:-1], fixed_capacity.parse_spec(spec).v_dim))


@torch.library.custom_op("kvpass::fixed_cache_early_exit_attention", mutates_args=())
def fixed_cache_early_exit_attention(q: torch.Tensor, buffer: torch.Tensor, positions: torch.Tensor,
                                     new_k: torch.Tensor, new_v: torch.Tensor, attn_mask: torch.Tensor | None,
                                     is_causal: bool, scale: float | None, spec: str, site: str) -> torch.Tensor:
    """``fixed_cache_attention`` for a spec with ``early_exit``: bounded decode attention, blocks counted in
    ``site``'s stats (``lowering.formats.fixed_early_exit``)."""
    return fixed_early_exit.attention(q, buffer, positions, new_k, new_v, attn_mask, is_causal, scale,
                                      fixed_capacity.parse_spec(spec), site)


@fixed_cache_early_exit_attention.register_fake
def _fixed_cache_early_exit_attention_fake(q, buffer, positions, new_k, new_v, attn_mask, is_causal, scale, spec,
                                           site):
    return q.new_empty((*q.shape[:-1], fixed_capacity.parse_spec(spec).v_dim))


@torch.library.custom_op("kvpass::fixed_budget_read", mutates_args=())
def fixed_budget_read(buffer: torch.Tensor, positions: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
                      spec: str, asl_store: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """What a budgeted PackedCache's ``update`` returns: its place in the graph, where the backend replaces it and
    the attention by ``fixed_budget_attention``. Run (the model not compiled by kvpass) it raises: the kept set is
    chosen with the query and the model's mask, which an ``update`` does not see (``fixed_budgeted.read``)."""
    return fixed_budgeted.read(fixed_capacity.parse_spec(spec))


@fixed_budget_read.register_fake
def _fixed_budget_read_fake(buffer, positions, new_k, new_v, spec, asl_store):
    s = fixed_capacity.parse_spec(spec)
    return (new_k.new_empty((s.batch, s.kv_heads, s.capacity, s.k_dim)),
            new_v.new_empty((s.batch, s.kv_heads, s.capacity, s.v_dim)))


@torch.library.custom_op("kvpass::fixed_budget_attention", mutates_args=("buffer", "asl_store"))
def fixed_budget_attention(q: torch.Tensor, buffer: torch.Tensor, positions: torch.Tensor, new_k: torch.Tensor,
                           new_v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None,
                           spec: str, site: str, asl_store: torch.Tensor | None) -> torch.Tensor:
    """A budgeted fixed-capacity cache's step: new_k, new_v [B, Hkv, n, D] at ``positions`` (int64 [n]) into the
    ``budget`` slots by the spec's policy, then q [B, Hq, Lq, D]'s attention over the kept tokens -> [B, Hq, Lq, Dv]
    (``lowering.formats.fixed_budgeted``; ADORE: ``lowering.formats.fixed_adore``); mutates ``buffer`` (and
    ``asl_store``, policy "asl")."""
    s = fixed_capacity.parse_spec(spec)
    step = fixed_adore.attention if s.policy == "adore" else fixed_budgeted.attention
    return step(q, buffer, positions, new_k, new_v, attn_mask, is_causal, scale, s, site, asl_store)


@fixed_budget_attention.register_fake
def _fixed_budget_attention_fake(q, buffer, positions, new_k, new_v, attn_mask, is_causal, scale, spec, site,
                                 asl_store):
    return q.new_empty((*q.shape[:-1], fixed_capacity.parse_spec(spec).v_dim))
