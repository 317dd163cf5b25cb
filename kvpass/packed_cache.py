"""``PackedCache``: a transformers ``Cache`` whose layers hold packed, fixed-capacity buffers.

    cache = PackedCache(model, batch_size=1, max_cache_len=4096, kv_bits=4)
    model.generate(ids, past_key_values=cache, max_new_tokens=256,
                   compile_config=CompileConfig(backend="kvpass", options={"mode": "reduce-overhead"}, mode=None))
    # or the forward compiled by kvpass (a budgeted policy needs this: its prefill too), generate's compile off:
    model.forward = torch.compile(model.forward, backend="kvpass", options={"mode": "reduce-overhead"})
    model.generate(ids, past_key_values=cache, max_new_tokens=256, disable_compile=True)

Each layer owns one flat ``uint8`` buffer laid out once for ``max_cache_len`` tokens by the ``kv_bits``
storage scheme (``lowering/formats/fixed_capacity.py``), allocated zeroed at construction and marked as a static
address (as HF's StaticCache marks its tensors) so CUDA graphs neither copy nor re-record it; the model's
full-precision [B, Hkv, max_cache_len, D] tensors are never allocated. ``update`` writes the new tokens at
the layer's length, a device counter advanced in place, by ``torch.ops.kvpass.fixed_cache_write``, and
returns ``fixed_cache_read``: the full-precision cache the model's attention expects, so the cache works
with any model and without kvpass compiling (slowly: the whole capacity is dequantized every call). Under
``torch.compile(backend="kvpass")`` the backend finds that read feeding an attention and replaces both by
``fixed_cache_attention`` over the packed buffer (``kvpass/variants/fixed_capacity.py``).

With ``policy`` and ``budget`` (the options' values: streaming, h2o, snapkv, asl, adore) each layer keeps
``budget`` token slots per KV head instead (``lowering/formats/fixed_budgeted.py``): ``update`` leaves the new
tokens to ``fixed_budget_read``, which the backend replaces with the attention that writes, selects and attends
(``fixed_budget_attention``); the kept set needs the query, so such a cache works only inside a kvpass-compiled
forward, prefill included (run uncompiled, the read raises and says so). ASL's cross-layer state is one store
per cache (``asl_store``), each layer's spec carrying its index.

It behaves as HF's StaticCache towards generate and the mask builders: compileable (generate compiles the
decode step with ``generation_config.compile_config``; on CUDA, without ``disable_compile=True``, with Inductor
around a forward the user compiled, which then does not run kvpass's rewrite), mask sizes of ``max_cache_len``,
the length a device tensor. ``max_cache_len`` is rounded up to a multiple of 64. Full attention layers only (sliding
windows are refused); beam search, ``crop`` and offloading are refused.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvpass.options import parse_options
from lowering.core import packed
from lowering.formats.early_exit import resolve_tolerance
from lowering.formats.fixed_budgeted import asl_store_layout
from lowering.formats.fixed_capacity import CAPACITY_MULTIPLE, FixedCacheSpec, allocate, clear
from lowering.storage import scheme_for


class PackedLayer(CacheLayerMixin):
    """One attention layer's packed, fixed-capacity cache (``spec``); ``buffer`` holds all its bytes."""

    is_compileable = True
    is_croppable = False
    is_sliding = False
    supports_early_init = False  # allocated at construction

    def __init__(self, spec: FixedCacheSpec, device: torch.device | str, asl_store: torch.Tensor | None = None):
        super().__init__()
        self.spec, self.spec_json = spec, spec.to_json()
        self.max_cache_len = spec.capacity
        self.buffer = allocate(spec, device)
        self.asl_store = asl_store  # ASL's per-forward store, the cache's (shared by its layers)
        self.device = self.buffer.device  # "cuda" -> "cuda:0", as the model's tensors say
        self.batch_size, self.num_heads = spec.batch, spec.kv_heads
        self.k_head_dim, self.v_head_dim = spec.k_dim, spec.v_dim
        # Tokens written: a device tensor advanced in place, so no step reads it back and no graph specialises on it.
        self.cumulative_length = torch.zeros((), dtype=torch.int64, device=self.device)
        torch._dynamo.mark_static_address(self.buffer)
        torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def lazy_initialization(self, *args, **kwargs) -> None:
        pass  # allocated at construction, before any graph is captured

    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        s = self.spec
        want = ((s.batch, s.kv_heads, s.k_dim), (s.batch, s.kv_heads, s.v_dim))
        got = ((*key_states.shape[:2], key_states.shape[-1]), (*value_states.shape[:2], value_states.shape[-1]))
        if got != want or str(key_states.dtype) != s.dtype or key_states.device != self.device:
            raise ValueError(
                f"PackedCache layer built for [B, Hkv, D] keys/values {want} in {s.dtype} on {self.device}, "
                f"got {got} in {key_states.dtype} on {key_states.device}: build the cache with this batch size, "
                "dtype and device")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write key_states, value_states [B, Hkv, n, D] at the layer's length; return the cache as
        full-precision [B, Hkv, max_cache_len, D] keys and values (positions past the length are masked)."""
        self._check(key_states, value_states)
        n = key_states.shape[-2]
        positions = torch.arange(n, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(n)
        if self.spec.budgeted:  # written by the attention, which chooses the kept tokens (fixed_budgeted.py)
            return torch.ops.kvpass.fixed_budget_read(self.buffer, positions, key_states, value_states, self.spec_json,
                                                      self.asl_store)
        torch.ops.kvpass.fixed_cache_write(self.buffer, positions, key_states, value_states, self.spec_json)
        return torch.ops.kvpass.fixed_cache_read(self.buffer, positions, key_states, value_states, self.spec_json)

    def get_mask_sizes(self, *args) -> tuple[int, int]:
        """(kv_length, kv_offset) of the model's mask: the whole capacity (the argument, a query length or in
        older transformers the cache positions, does not matter)."""
        return self.max_cache_len, 0

    def get_seq_length(self) -> torch.Tensor:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.max_cache_len

    get_max_cache_shape = get_max_length  # the same method's name in transformers releases before 5.25

    def reset(self) -> None:
        clear(self.buffer, self.spec)
        self.cumulative_length.zero_()

    def offload(self):
        raise NotImplementedError("PackedCache does not offload")

    def prefetch(self):
        raise NotImplementedError("PackedCache does not offload")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PackedCache cannot be cropped (assisted generation): int4's groups "
                                  "and residual are not rolled back")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("PackedCache does not support beam search")

    @property
    def nbytes(self) -> int:
        return self.buffer.untyped_storage().nbytes()


def _checked_policy(policy: str, budget, kv_bits, early_exit, asl_layers):
    """The options as the backend validates them (ValueError naming the key); early exit with a policy refused."""
    opts = parse_options({"policy": policy, "budget": budget, "kv_bits": kv_bits, "early_exit": early_exit,
                          "asl_layers": asl_layers})
    if opts.policy != "full" and opts.early_exit is not None:
        raise ValueError(f"PackedCache: early_exit with policy {opts.policy!r} is not on fixed buffers; use the "
                         "general path (HF's DynamicCache compiled with kvpass and the options policy, budget and "
                         "early_exit), or one of the two on a PackedCache")
    return opts


def _text_config(config_or_model):
    config = getattr(config_or_model, "config", config_or_model)
    return config.get_text_config(decoder=True)


def _model_dtype_device(config_or_model):
    parameter = next(config_or_model.parameters(), None) if isinstance(config_or_model, torch.nn.Module) else None
    return (None, None) if parameter is None else (parameter.dtype, parameter.device)


def _check_full_attention(config) -> None:
    layer_types = getattr(config, "layer_types", None)
    sliding = (any(t != "full_attention" for t in layer_types) if layer_types is not None
               else getattr(config, "sliding_window", None) is not None)
    if sliding:
        raise NotImplementedError(f"PackedCache holds full-attention layers only; this config has "
                                  f"sliding or other layer types ({layer_types or 'sliding_window'})")


class PackedCache(Cache):
    """A packed KV cache of fixed capacity for every attention layer of a model (``kv_bits`` as the option:
    16, 8, "fp8", 4, "aligned"). ``config_or_model``: the model (its dtype and device are the defaults) or its
    config; ``batch_size``: the batch it serves (exactly); ``max_cache_len``: prompt plus generated tokens,
    rounded up to a multiple of 64; ``early_exit``: as the option (None, True or a tolerance in [0, 1)): block
    summaries in the buffer and bounded decode attention (``lowering/formats/fixed_early_exit.py``);
    ``policy``, ``budget``, ``asl_layers``: as the options, ``budget`` token slots per layer and KV head kept by
    the policy (``lowering/formats/fixed_budgeted.py``; not with ``early_exit``). ``nbytes``: the bytes all layers
    (and ASL's store) hold."""

    def __init__(self, config_or_model, batch_size: int, max_cache_len: int, kv_bits: int | str = 8,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 early_exit: bool | float | None = None, policy: str = "full", budget: int | None = None,
                 asl_layers: tuple[int, int] | None = None):
        config = _text_config(config_or_model)
        _check_full_attention(config)
        scheme_for(kv_bits)  # NotImplementedError naming the schemes for a bad value
        opts = _checked_policy(policy, budget, kv_bits, early_exit, asl_layers)  # ValueError as the options
        tolerance = resolve_tolerance(opts.early_exit)
        model_dtype, model_device = _model_dtype_device(config_or_model)
        dtype = dtype or model_dtype or torch.float32
        device = device or model_device or "cpu"
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if batch_size < 1 or max_cache_len < 1:
            raise ValueError(f"batch_size and max_cache_len must be >= 1, got {batch_size}, {max_cache_len}")
        capacity = -(-max_cache_len // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
        spec = FixedCacheSpec(kv_bits=kv_bits, batch=batch_size, kv_heads=kv_heads, capacity=capacity,
                              k_dim=head_dim, v_dim=head_dim, dtype=str(dtype), early_exit=tolerance,
                              policy=opts.policy, budget=opts.budget, asl_layers=opts.asl_layers)
        self.spec = spec
        self.asl_store = None
        if spec.policy == "asl":  # ASL's cross-layer rule: a store shared by the layers, each its own index
            self.asl_store = torch.zeros(packed.layout_nbytes(asl_store_layout(spec)), dtype=torch.uint8,
                                         device=device)
            torch._dynamo.mark_static_address(self.asl_store)
        specs = [dataclasses.replace(spec, layer=i) if spec.policy == "asl" else spec
                 for i in range(config.num_hidden_layers)]
        super().__init__(layers=[PackedLayer(s, device, self.asl_store) for s in specs])

    @property
    def max_cache_len(self) -> int:
        return self.spec.capacity

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: every layer's buffer (and ASL's store)."""
        store = 0 if self.asl_store is None else self.asl_store.numel()
        return sum(layer.nbytes for layer in self.layers) + store
