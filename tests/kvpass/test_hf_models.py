"""kvpass on Hugging Face models built from config with random weights: every attention site is
matched and rewritten, greedy tokens equal eager's, logits agree within float32 rounding.

Tolerance: the models run in float32; the rewritten op computes the same softmax(q k^T) v through
torch's SDPA instead of the model's own ops, so logits differ only by float32 rounding accumulated
over 2 layers: ~1e-6 relative in practice; 1e-4 absolute on logits of magnitude ~1 leaves margin while
still catching any wrong mask, scale or cache read (those move logits by > 1e-2).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import kvpass
import zoo

LOGIT_ATOL = 1e-4
NEW_TOKENS = 5


def _generate(model, ids, mask, *, static: bool, sample: bool, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=sample, return_dict_in_generate=True, output_logits=True,
                  cache_implementation="static" if static else None)
    if sample:
        kwargs.update(top_k=0, top_p=1.0, temperature=1.0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **kwargs)
    return out.sequences, torch.stack(out.logits)


def _check_against_eager(arch, impl, batch, static, sample, compiler="eager"):
    model = zoo.build(arch, impl)
    ids, mask = zoo.prompt(batch, left_padding=batch > 1)
    ref_tokens, ref_logits = _generate(model, ids, mask, static=static, sample=sample)
    model.forward = torch.compile(model.forward, backend="kvpass", options={"compiler": compiler})
    tokens, logits = _generate(model, ids, mask, static=static, sample=sample)

    assert torch.equal(tokens, ref_tokens), f"{arch}/{impl}: tokens differ\n{tokens}\n{ref_tokens}"
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, ref_logits, atol=LOGIT_ATOL, rtol=0)

    report = kvpass.report()
    layers = model.config.num_hidden_layers
    assert report.graphs, "kvpass compiled no graph"
    for graph in report.graphs:
        assert len(graph.sites) == layers, str(report)
        assert all(s.status == "rewritten" for s in graph.sites), str(report)
    expected_pattern = "sdpa" if impl == "sdpa" else "matmul_softmax"
    assert {s.pattern for s in report.sites} == {expected_pattern}
    expected_cache = "static_cache_index_copy" if static else "dynamic_cache_cat"
    assert {s.cache for s in report.sites} == {expected_cache}, str(report)
    calls = kvpass.stats()["attention_calls"]
    if zoo.DEVICE == "cuda" and compiler == "eager":
        # every decode step (NEW_TOKENS - 1 of them, each through every layer) ran the Triton kernel
        assert calls.get("triton_decode", 0) >= (NEW_TOKENS - 1) * layers, calls
    elif compiler == "eager":
        assert calls.get("torch_sdpa", 0) >= NEW_TOKENS * layers, calls
    return report


# Every architecture in both attention implementations; the cache, batch and decoding choices rotate so
# each architecture sees both caches, padding and sampling (the full product runs for llama below).
ROTATING = [
    pytest.param(arch, impl, batch, static, sample, id=f"{arch}-{impl}-b{batch}-{'static' if static else 'dyn'}-"
                 f"{'sample' if sample else 'greedy'}")
    for i, (arch, impl) in enumerate(itertools.product(sorted(zoo.ZOO), ("sdpa", "eager")))
    for batch, static, sample in [((1, 3)[i % 2], bool((i // 2) % 2), bool(i % 3 == 0))]
]


@pytest.mark.parametrize("arch, impl, batch, static, sample", ROTATING)
def test_architecture_matches_eager(arch, impl, batch, static, sample):
    if arch == "gpt2" and static:
        static = False  # GPT-2's HF class keeps a DynamicCache only
    _check_against_eager(arch, impl, batch, static, sample)


@pytest.mark.parametrize("impl, batch, static, sample",
                         list(itertools.product(("sdpa", "eager"), (1, 3), (False, True), (False, True))))
def test_llama_full_product(impl, batch, static, sample):
    _check_against_eager("llama", impl, batch, static, sample)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_llama_through_inductor(static):
    """The default compiler: the rewritten graph is lowered by Inductor (C++ on the CPU)."""
    _check_against_eager("llama", "sdpa", 3, static, sample=False, compiler="inductor")
