"""PackedCache: fixed-capacity packed caches through HF generate, eager and compiled.

Greedy tokens equal the general packed path's (DynamicCache rewritten by the backend with the same kv_bits),
the compiled graph attends over the packed buffer (no dequantized cache in it), decode graphs keep their input
shapes and compile once whatever the number of tokens, and the cache holds only its packed bytes."""
from __future__ import annotations

import gc

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from transformers import CompileConfig

import kvpass
import lowering.formats.fixed_capacity
import zoo
from kvpass import _compat
from kvpass.backend import kvpass_backend
from kvpass.packed_cache import PackedCache
from lowering.core import packed
from lowering.core.limits import MAX_DECODE_QUERY_LEN

KV_BITS = (16, 8, "fp8", 4, "aligned")
EAGER = {"compiler": "eager"}
NEW_TOKENS = 40  # past the first int4 group boundary (32) from every prompt below
EAGER_NEW_TOKENS = 24  # 9-token prompts: past the boundary too


def generate(model, ids, mask, cache=None, new_tokens=NEW_TOKENS, **kwargs):
    """Greedy generation; without a compile_config, generate's own compilation is off: on CUDA it compiles the
    decode step of a compileable cache with Inductor around the forward the test compiled, so the rewrite under
    test would not be what ran."""
    if "compile_config" not in kwargs:
        kwargs["disable_compile"] = True
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              past_key_values=cache, **kwargs)


def general_path(name, kv_bits, ids, mask, new_tokens=NEW_TOKENS, **options):
    """Greedy tokens of the general packed path: HF's DynamicCache rewritten by the backend with these options."""
    model = zoo.build(name)
    model.forward = torch.compile(model.forward, backend="kvpass", options={**EAGER, "kv_bits": kv_bits, **options})
    out = generate(model, ids, mask, new_tokens=new_tokens, min_new_tokens=new_tokens)
    torch._dynamo.reset()
    return out


def packed_cache(model, ids, kv_bits, new_tokens=NEW_TOKENS):
    return PackedCache(model, batch_size=ids.shape[0], max_cache_len=ids.shape[1] + new_tokens,
                              kv_bits=kv_bits)


MATRIX = [("llama", bits) for bits in KV_BITS] + [(name, bits) for name in ("qwen2", "mistral", "phi3", "gpt2",
                                                                           "gpt_neox") for bits in (8, 4)]


@pytest.mark.parametrize("name,kv_bits", MATRIX, ids=[f"{n}-{b}" for n, b in MATRIX])
def test_eager_generate_equals_the_general_path(name, kv_bits):
    """Without compiling, the cache's update returns the dequantized capacity: the same tokens as the
    backend's DynamicCache rewrite (batch 3, left padding)."""
    ids, mask = zoo.prompt(3, left_padding=True)
    model = zoo.build(name)
    out = generate(model, ids, mask, packed_cache(model, ids, kv_bits, EAGER_NEW_TOKENS), new_tokens=EAGER_NEW_TOKENS)
    assert torch.equal(out, general_path(name, kv_bits, ids, mask, EAGER_NEW_TOKENS))


COMPILED = [(bits, 3, 9) for bits in KV_BITS] + [(bits, 1, n) for bits in (8, 4) for n in (1, 20)]


@pytest.mark.parametrize("kv_bits,batch,length", COMPILED, ids=[f"{b}-{n}x{m}" for b, n, m in COMPILED])
def test_compiled_generate_attends_over_the_packed_buffer(kv_bits, batch, length, monkeypatch):
    """fullgraph compile: the same tokens as the general path, every site rewritten to fixed_cache_attention,
    and no decode step dequantizes the cache (the read op is gone from the graph)."""
    ids, mask = zoo.prompt(batch, length, left_padding=batch > 1)
    want = general_path("llama", kv_bits, ids, mask)
    kvpass.reset()
    reads = []
    real_read = lowering.formats.fixed_capacity.read
    monkeypatch.setattr(lowering.formats.fixed_capacity, "read",
                        lambda buffer, positions, new_k, *a: reads.append(new_k.shape[2]) or real_read(
                            buffer, positions, new_k, *a))
    model = zoo.build("llama")
    cache = packed_cache(model, ids, kv_bits)
    model.forward = checked = zoo.SyncChecked(torch.compile(model.forward, backend="kvpass", options=EAGER,
                                                              fullgraph=True))
    out = generate(model, ids, mask, cache)
    assert torch.equal(out, want)
    checked.assert_checked()
    # only a prefill-length step (> 16 tokens) reads the cache dequantized: the reference path of prefill
    assert reads == ([length] * len(cache.layers) if length > MAX_DECODE_QUERY_LEN
                     else []), reads
    sites = kvpass.report().sites
    assert sites and all(s.cache == "kvpass_packed_cache" and s.lowering.startswith("fixed_cache_attention")
                         and s.cuda_graphs == "yes" for s in sites), str(kvpass.report())


def recording_backend(calls):
    """kvpass, with the shapes of every call's inputs recorded per compiled graph."""
    def backend(gm, example_inputs, **kwargs):
        compiled = kvpass_backend(gm, example_inputs, options=EAGER)
        index = len(calls)
        calls.append([])

        def run(*args):
            calls[index].append(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
            return compiled(*args)

        return run

    return backend


def assert_decode_graph_fixed(make_cache, token_counts=(3, 24)) -> None:
    """The shape contract: generating ``token_counts`` new tokens (fullgraph) over ``make_cache(model, ids,
    new_tokens)``, the decode graph's input shapes do not change across the steps and two graphs are compiled
    (prefill + one decode graph) whatever the count."""
    ids, mask = zoo.prompt(1)
    counts = []
    for new_tokens in token_counts:
        torch._dynamo.reset()
        calls = []
        model = zoo.build("llama")
        cache = make_cache(model, ids, new_tokens)
        model.forward = torch.compile(model.forward, backend=recording_backend(calls), fullgraph=True)
        before = _compat.dynamo_compile_count()
        generate(model, ids, mask, cache, new_tokens=new_tokens)
        counts.append(_compat.dynamo_compile_count() - before)
        assert len(calls) == 2, [len(c) for c in calls]
        decode = calls[1]
        assert len(decode) == new_tokens - 1 and len(set(decode)) == 1, set(decode)
    assert set(counts) == {2}, counts


@pytest.mark.parametrize("kv_bits", KV_BITS, ids=str)
def test_decode_graph_keeps_its_shapes_and_compiles_once(kv_bits):
    """Across N decode steps the decode graph's input shapes do not change, and the number of graphs
    compiled is the same for 3 and 24 new tokens (prefill + one decode graph)."""
    assert_decode_graph_fixed(lambda model, ids, n: packed_cache(model, ids, kv_bits, n))


def test_hf_compile_config_path():
    """generate's own compiled decode step (CompileConfig) with the cache: same tokens as the eager cache."""
    ids, mask = zoo.prompt(3, left_padding=True)
    model = zoo.build("llama")
    want = generate(model, ids, mask, packed_cache(model, ids, 4))
    config = CompileConfig(backend="kvpass", options=EAGER, mode=None, fullgraph=True)
    config._compile_all_devices = True  # HF auto-compiles only on CUDA unless told otherwise
    out = generate(model, ids, mask, packed_cache(model, ids, 4), compile_config=config)
    assert torch.equal(out, want)
    sites = kvpass.report().sites
    assert sites and all(s.lowering.startswith("fixed_cache_attention") for s in sites), str(kvpass.report())


@pytest.mark.parametrize("kv_bits", KV_BITS, ids=str)
def test_cache_holds_only_its_packed_bytes(kv_bits):
    """The cache's bytes are its layout's; after compiled decode steps no full-precision tensor of the
    cache's length is alive (the model's [B, Hkv, max_len, D] tensors are never made)."""
    ids, mask = zoo.prompt(1)
    model = zoo.build("llama")
    cache = packed_cache(model, ids, kv_bits)
    layout_bytes = packed.layout_nbytes(cache.spec.layout)
    assert cache.nbytes == layout_bytes * len(cache.layers)
    model.forward = torch.compile(model.forward, backend="kvpass", options=EAGER, fullgraph=True)
    generate(model, ids, mask, cache, new_tokens=4)
    assert not live_tensors_of_length(cache.max_cache_len)
    for layer in cache.layers:
        assert layer.keys is None and layer.values is None
        assert layer.buffer.dtype == torch.uint8 and layer.buffer.numel() == layout_bytes


def live_tensors_of_length(length: int) -> list[tuple]:
    """Shapes of the live real (not fake: compiled graphs keep theirs) floating [B, H, length, D] tensors."""
    gc.collect()
    return [tuple(t.shape) for t in gc.get_objects() if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor)
            and t.is_floating_point() and t.dim() == 4 and t.shape[2] == length]


def test_live_tensor_check_sees_a_full_precision_cache():
    full = torch.zeros(1, 2, 192, 16)  # noqa: F841  (held: the check must find it)
    assert live_tensors_of_length(192) == [(1, 2, 192, 16)]


def test_bad_arguments_are_refused():
    model = zoo.build("llama")
    ids, mask = zoo.prompt(3, left_padding=True)
    with pytest.raises(NotImplementedError, match="kv_bits=3"):
        PackedCache(model, batch_size=1, max_cache_len=64, kv_bits=3)
    with pytest.raises(ValueError, match="batch size"):
        generate(model, ids, mask, PackedCache(model, batch_size=1, max_cache_len=64, kv_bits=8))
    sliding = zoo.build("mistral")
    sliding.config.sliding_window, sliding.config.layer_types = 16, None
    with pytest.raises(NotImplementedError, match="full-attention layers only"):
        PackedCache(sliding, batch_size=1, max_cache_len=64)


def test_capacity_rounds_up_to_the_grid():
    cache = PackedCache(zoo.build("llama"), batch_size=1, max_cache_len=65, kv_bits=8)
    assert cache.max_cache_len == 128 and cache.get_max_length() == 128


def test_report_says_which_sites_cuda_graphs_capture():
    """Per site: PackedCache sites are capturable; the general packed path's are not, with the reason."""
    ids, mask = zoo.prompt(1)
    model = zoo.build("llama")
    model.forward = torch.compile(model.forward, backend="kvpass", options={**EAGER, "kv_bits": 8})
    generate(model, ids, mask, new_tokens=2)
    sites = kvpass.report().to_dict()["graphs"][0]["sites"]
    assert sites and all(s["cuda_graphs"].startswith("no: a packed DynamicCache") for s in sites), sites
    assert "[CUDA graphs: no" in str(kvpass.report())


def test_a_site_reading_the_cache_otherwise_keeps_the_dequantized_read():
    """GPT-2's eager attention transposes the cached keys itself: that site keeps the read and attends exactly
    over it (same tokens, reported), rather than guessing what the transpose feeds."""
    ids, mask = zoo.prompt(1)
    model = zoo.build("gpt2", "eager")
    want = generate(model, ids, mask, packed_cache(model, ids, 4, 4), new_tokens=4)
    model.forward = torch.compile(model.forward, backend="kvpass", options=EAGER)
    assert torch.equal(generate(model, ids, mask, packed_cache(model, ids, 4, 4), new_tokens=4), want)
    sites = kvpass.report().sites
    assert sites and all(s.lowering.startswith("FALLBACK to exact over the dequantized cache")
                         and "also read by transpose" in s.lowering for s in sites), str(kvpass.report())


ZOO_COMPILED = [(name, bits) for name in ("qwen2", "mistral", "phi3", "gpt2", "gpt_neox") for bits in (8, 4)]


@pytest.mark.parametrize("name,kv_bits", ZOO_COMPILED, ids=[f"{n}-{b}" for n, b in ZOO_COMPILED])
def test_compiled_generate_on_the_zoo_models(name, kv_bits):
    """Each zoo architecture, fullgraph compile, batch 3 with left padding: the general path's tokens, and every
    site rewritten to attend over the packed buffer (capturable)."""
    ids, mask = zoo.prompt(3, left_padding=True)
    want = general_path(name, kv_bits, ids, mask)
    kvpass.reset()
    model = zoo.build(name)
    model.forward = checked = zoo.SyncChecked(torch.compile(model.forward, backend="kvpass", options=EAGER,
                                                              fullgraph=True))
    assert torch.equal(generate(model, ids, mask, packed_cache(model, ids, kv_bits)), want)
    checked.assert_checked()
    sites = kvpass.report().sites
    assert sites and all(s.lowering.startswith("fixed_cache_attention") and s.cuda_graphs == "yes"
                         for s in sites), str(kvpass.report())
