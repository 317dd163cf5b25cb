"""PackedCache(..., early_exit=...): block summaries in the fixed buffers, bounded decode attention over the capacity.

Greedy tokens equal the general path's with the same options (DynamicCache rewritten by the backend with kv_bits
and early_exit), generation running past several 64-token summary blocks; the blocks counted per site are the
general path's; decode graphs keep their input shapes and compile once; the cache holds only its layout's bytes
(the scheme's sections and the summaries); a bad tolerance is refused as the option refuses it."""
from __future__ import annotations

import pytest
import torch
from test_packed_cache import assert_decode_graph_fixed, generate, live_tensors_of_length
from transformers import CompileConfig

import kvpass
import zoo
from kvpass.packed_cache import PackedCache
from lowering.attention.early_exit import bound
from lowering.core import packed
from lowering.core.limits import MAX_DECODE_QUERY_LEN

EAGER = {"compiler": "eager"}
LONG = 130  # new tokens: from a 9-token prompt past the summary blocks' boundaries at 64 and 128
PER_TOKEN_SCHEMES = (16, 8, "fp8", "aligned")  # int4 summarises a completed group's codes, the general path not


def general_path(kv_bits, ids, mask, new_tokens, tol=True):
    model = zoo.build("llama")
    options = {**EAGER, "kv_bits": kv_bits, "early_exit": tol}
    model.forward = torch.compile(model.forward, backend="kvpass", options=options)
    kvpass.reset()
    out = generate(model, ids, mask, new_tokens=new_tokens, min_new_tokens=new_tokens)
    blocks = _blocks(kvpass.stats())
    torch._dynamo.reset()
    return out, blocks


def _blocks(stats) -> dict:
    return {site: (s["blocks_read"], s["blocks_total"]) for site, s in stats["sites"].items()}


def packed_cache(model, ids, kv_bits, new_tokens, tol=True):
    return PackedCache(model, batch_size=ids.shape[0], max_cache_len=ids.shape[1] + new_tokens, kv_bits=kv_bits,
                       early_exit=tol)


CASES = ([(bits, 3, 9, LONG) for bits in (16, 8, "fp8", 4, "aligned")]
         + [(bits, 1, 1, 70) for bits in (8, 4)] + [(16, 1, 20, 70)])


@pytest.mark.parametrize("kv_bits,batch,length,new_tokens", CASES,
                         ids=[f"{b}-{n}x{m}+{t}" for b, n, m, t in CASES])
def test_compiled_generate_equals_the_general_path(kv_bits, batch, length, new_tokens):
    """fullgraph compile over the cache: the general path's tokens, every site on the bounded attention and,
    where both paths attend a prompt the same way (a mask, or a prefill longer than a decode step), the same
    blocks read and counted."""
    ids, mask = zoo.prompt(batch, length, left_padding=batch > 1)
    want, want_blocks = general_path(kv_bits, ids, mask, new_tokens)
    kvpass.reset()
    model = zoo.build("llama")
    cache = packed_cache(model, ids, kv_bits, new_tokens)
    model.forward = checked = zoo.SyncChecked(torch.compile(model.forward, backend="kvpass", options=EAGER,
                                                              fullgraph=True))
    out = generate(model, ids, mask, cache, new_tokens=new_tokens, min_new_tokens=new_tokens)
    assert out.shape[1] == length + new_tokens and torch.equal(out, want)
    checked.assert_checked()
    sites = kvpass.report().sites
    assert sites and all(s.lowering.startswith("fixed_cache_attention") and "early exit at tolerance 0.001"
                         in s.lowering and s.cuda_graphs == "yes" for s in sites), str(kvpass.report())
    blocks = _blocks(kvpass.stats())
    assert set(blocks) == set(want_blocks) and all(total > 0 for _, total in blocks.values())
    if kv_bits in PER_TOKEN_SCHEMES and (batch > 1 or length > MAX_DECODE_QUERY_LEN):  # batch 1: SDPA's is_causal
        assert blocks == want_blocks
    # the cache's lengths at each bounded attention: a prompt of a decode step's length is one (the cache gives a
    # mask), then every decode step
    first = length if length <= MAX_DECODE_QUERY_LEN else length + 1
    steps = sum(bound.num_blocks(n) for n in range(first, length + new_tokens))
    assert all(total == batch * 2 * steps for _, total in blocks.values()), blocks


def test_hf_compile_config_path():
    """generate's own compiled decode step (CompileConfig) over an early-exit cache: the general path's tokens."""
    ids, mask = zoo.prompt(3, left_padding=True)
    want, _ = general_path(4, ids, mask, 70)
    model = zoo.build("llama")
    config = CompileConfig(backend="kvpass", options=EAGER, mode=None, fullgraph=True)
    config._compile_all_devices = True  # HF auto-compiles only on CUDA unless told otherwise
    kvpass.reset()
    out = generate(model, ids, mask, packed_cache(model, ids, 4, 70), new_tokens=70, min_new_tokens=70,
                   compile_config=config)
    assert torch.equal(out, want)
    sites = kvpass.report().sites
    assert sites and all("early exit at tolerance" in s.lowering for s in sites), str(kvpass.report())


@pytest.mark.parametrize("kv_bits", [8, 4], ids=str)
def test_decode_graph_keeps_its_shapes_and_compiles_once(kv_bits):
    """Across N decode steps the decode graph's input shapes do not change, and the graphs compiled are the same
    for 3 and 70 new tokens (prefill + one decode graph), the latter past a summary block's boundary."""
    assert_decode_graph_fixed(lambda model, ids, n: packed_cache(model, ids, kv_bits, n), (3, 70))


@pytest.mark.parametrize("kv_bits", [16, 8, 4], ids=str)
def test_cache_holds_its_layout_bytes(kv_bits):
    """The bytes are the layout's (the scheme's sections plus the summaries of capacity / 64 blocks); after
    compiled decode steps no full-precision tensor of the cache's length is alive."""
    ids, mask = zoo.prompt(1)
    model = zoo.build("llama")
    cache = packed_cache(model, ids, kv_bits, 60)
    spec = cache.spec
    summaries = bound.summary_layout(1, spec.kv_heads, spec.capacity, spec.k_dim, spec.torch_dtype)
    assert spec.layout == {**spec.layout_at(spec.stored_length), **summaries}
    assert cache.nbytes == packed.layout_nbytes(spec.layout) * len(cache.layers)
    model.forward = torch.compile(model.forward, backend="kvpass", options=EAGER, fullgraph=True)
    generate(model, ids, mask, cache, new_tokens=4)
    assert not live_tensors_of_length(cache.max_cache_len)


def test_a_bad_tolerance_is_refused_as_the_option_refuses_it():
    model = zoo.build("llama")
    for bad in (1.0, -1e-3, "fast", False):
        with pytest.raises(ValueError, match="kvpass option 'early_exit'"):
            PackedCache(model, batch_size=1, max_cache_len=64, early_exit=bad)
    assert PackedCache(model, batch_size=1, max_cache_len=64).spec.early_exit is None
    assert PackedCache(model, batch_size=1, max_cache_len=64, early_exit=0).spec.early_exit == 0.0
