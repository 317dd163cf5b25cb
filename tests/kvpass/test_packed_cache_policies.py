"""PackedCache(..., policy=, budget=): budgeted policies on fixed-capacity buffers through HF generate.

Greedy tokens equal the general path's with the same options (DynamicCache rewritten by the backend with policy,
budget and kv_bits) for every policy and kv_bits, batch 1 and batch 3 with left padding, prompts shorter than,
as long as and longer than the budget, generation past it; every site attends through ``fixed_budget_attention``
(CUDA-graph capturable), decode graphs keep their input shapes and compile once whatever the number of tokens,
and the cache holds its layout's bytes only (no full-precision tensor of its capacity). The options are validated
as the backend validates them; a cache the model runs uncompiled refuses, saying what to do."""
from __future__ import annotations

import pytest
import torch
from test_packed_cache import assert_decode_graph_fixed, general_path, generate, live_tensors_of_length

import kvpass
import zoo
from kvpass.packed_cache import PackedCache
from lowering.core import packed
from lowering.formats import FORMATS
from lowering.formats.fixed_budgeted import asl_store_layout

POLICIES = [p for p in FORMATS if p != "full"]
KV_BITS = (16, 8, "fp8", 4, "aligned")
EAGER = {"compiler": "eager"}
NEW_TOKENS = 24
# ASL's rule from the first layer over both layers of the tiny models: its cross-layer store is read and written
# (the paper's (10, 8) would leave a 2-layer model SnapKV's selection without touching it)
ASL_LAYERS = (0, 2)


def policy_options(policy, budget):
    return {"policy": policy, "budget": budget, **({"asl_layers": ASL_LAYERS} if policy == "asl" else {})}


def packed_cache(model, ids, kv_bits, policy, budget, new_tokens=NEW_TOKENS):
    return PackedCache(model, batch_size=ids.shape[0], max_cache_len=ids.shape[1] + new_tokens, kv_bits=kv_bits,
                       **policy_options(policy, budget))


# batch 3, left padding, a 9-token prompt over a budget of 8: every policy with every kv_bits;
# batch 1, budget 24: prompts shorter than, as long as and longer than the budget (a scheme each, in turn), and a
# 9-token prompt over a budget of 8 (HF gives the general path SDPA's is_causal there: its prefill)
CASES = ([(policy, bits, 3, 9, 8) for policy in POLICIES for bits in KV_BITS]
         + [(policy, KV_BITS[(i + j) % len(KV_BITS)], 1, length, 24) for i, policy in enumerate(POLICIES)
            for j, length in enumerate((20, 24, 40))]
         + [(policy, 16, 1, 9, 8) for policy in POLICIES])


@pytest.mark.parametrize("policy,kv_bits,batch,length,budget", CASES,
                         ids=[f"{p}-{b}-{n}x{m}-budget{k}" for p, b, n, m, k in CASES])
def test_compiled_generate_equals_the_general_path(policy, kv_bits, batch, length, budget):
    """fullgraph compile over the cache: the general path's tokens, every site on fixed_budget_attention."""
    ids, mask = zoo.prompt(batch, length, left_padding=batch > 1)
    want = general_path("llama", kv_bits, ids, mask, NEW_TOKENS, **policy_options(policy, budget))
    kvpass.reset()
    model = zoo.build("llama")
    cache = packed_cache(model, ids, kv_bits, policy, budget)
    model.forward = checked = zoo.SyncChecked(torch.compile(model.forward, backend="kvpass", options=EAGER,
                                                              fullgraph=True))
    out = generate(model, ids, mask, cache, new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert out.shape[1] == length + NEW_TOKENS and torch.equal(out, want)
    checked.assert_checked()
    sites = kvpass.report().sites
    assert sites and all(s.lowering.startswith("fixed_budget_attention") and f"policy {policy}" in s.lowering
                         and s.cuda_graphs == "yes" for s in sites), str(kvpass.report())
    held = torch.stack([packed.views(layer.buffer, layer.spec.layout)["pos"] for layer in cache.layers])
    assert ((held >= 0).sum(-1) == budget).all()  # the generation ran past the budget: every slot holds a token


@pytest.mark.parametrize("policy", POLICIES)
def test_decode_graph_keeps_its_shapes_and_compiles_once(policy):
    """Across N decode steps the decode graph's input shapes do not change, and the graphs compiled are the same
    for 3 and 24 new tokens (prefill + one decode graph), the latter evicting on every step past the budget."""
    assert_decode_graph_fixed(lambda model, ids, n: packed_cache(model, ids, 8, policy, 12, n))


@pytest.mark.parametrize("policy", POLICIES)
def test_cache_holds_its_layout_bytes(policy):
    """The bytes are the layout's (budget slots, positions, scores; ADORE's cold store; ASL's store once per cache);
    after compiled decode steps no full-precision tensor of the cache's capacity is alive."""
    ids, mask = zoo.prompt(1, 20)
    model = zoo.build("llama")
    cache = packed_cache(model, ids, 4, policy, 8)
    spec = cache.spec
    store = packed.layout_nbytes(asl_store_layout(spec)) if policy == "asl" else 0
    assert cache.nbytes == packed.layout_nbytes(spec.layout) * len(cache.layers) + store
    assert spec.layout["pos"][0] == (1, spec.kv_heads, 8)
    model.forward = torch.compile(model.forward, backend="kvpass", options=EAGER, fullgraph=True)
    generate(model, ids, mask, cache, new_tokens=12)
    assert not live_tensors_of_length(cache.max_cache_len)
    for layer in cache.layers:
        assert layer.buffer.dtype == torch.uint8 and layer.buffer.numel() == packed.layout_nbytes(spec.layout)


def test_options_are_refused_as_the_backend_refuses_them():
    model = zoo.build("llama")
    bad = [({"policy": "lru", "budget": 8}, "'policy'"), ({"policy": "h2o"}, "'budget'"),
           ({"policy": "h2o", "budget": 0}, "'budget'"), ({"budget": 8}, "'budget'"),
           ({"policy": "h2o", "budget": 8, "asl_layers": (1, 2)}, "'asl_layers'")]
    for options, key in bad:
        with pytest.raises(ValueError, match=f"kvpass option {key}"):
            PackedCache(model, batch_size=1, max_cache_len=64, **options)
    with pytest.raises(ValueError, match="early_exit with policy 'snapkv'.*general path"):
        PackedCache(model, batch_size=1, max_cache_len=64, policy="snapkv", budget=8, early_exit=True)


def test_a_model_run_uncompiled_refuses_and_says_to_compile():
    """The kept set is chosen with the query, which the cache's update does not see: without kvpass compiling the
    forward (HF's CompileConfig compiles the decode step only: the prefill runs uncompiled) the read refuses."""
    ids, mask = zoo.prompt(1)
    model = zoo.build("llama")
    with pytest.raises(RuntimeError, match="torch.compile\\(model.forward, backend='kvpass'\\)"):
        generate(model, ids, mask, packed_cache(model, ids, 8, "streaming", 8), new_tokens=2)
