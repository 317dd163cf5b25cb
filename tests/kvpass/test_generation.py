"""Generation-level behaviour: a module's own preallocated cache, recompilation, HF's compiled
generate path, the entry point, and the compile-time log."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kvpass
import zoo
from kvpass import _compat


class PreallocatedCacheAttention(nn.Module):
    """gpt-fast style: K/V written into fixed buffers by index assignment, attention over the whole
    buffer with a bool mask of the filled positions."""

    def __init__(self, dim=32, heads=4, kv_heads=2, max_len=24):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.register_buffer("k_cache", torch.zeros(1, kv_heads, max_len, self.head_dim))
        self.register_buffer("v_cache", torch.zeros(1, kv_heads, max_len, self.head_dim))

    def forward(self, x, input_pos, mask):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
        self.k_cache[:, :, input_pos] = k.transpose(1, 2)
        self.v_cache[:, :, input_pos] = v.transpose(1, 2)
        return F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)


def test_module_with_its_own_preallocated_cache():
    torch.manual_seed(0)
    eager, compiled_module = PreallocatedCacheAttention().eval(), PreallocatedCacheAttention().eval()
    compiled_module.load_state_dict(eager.state_dict())
    step = torch.compile(compiled_module, backend="kvpass", options={"compiler": "eager"})
    causal = torch.tril(torch.ones(24, 24, dtype=torch.bool))
    x = torch.randn(1, 24, 32)
    with torch.no_grad():
        for start, end in [(0, 6), (6, 7), (7, 8), (8, 9)]:  # a prefill, then decode steps
            pos = torch.arange(start, end)
            mask = causal[None, None, start:end]
            ref = eager(x[:, start:end], pos, mask)
            out = step(x[:, start:end], pos, mask)
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    sites = kvpass.report().sites
    assert sites and all(s.status == "rewritten" and s.cache == "buffer_index_put" for s in sites), \
        str(kvpass.report())


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_compiles_do_not_grow_with_generated_tokens(static):
    """Generating N tokens must not compile once per token: the count is the same for 3 and 12 tokens."""
    model = zoo.build("llama")
    model.forward = torch.compile(model.forward, backend="kvpass", options={"compiler": "eager"})
    ids, mask = zoo.prompt(1)
    counts = []
    for new_tokens in (3, 12):
        torch._dynamo.reset()
        kvpass.reset()
        before = _compat.dynamo_compile_count()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                           cache_implementation="static" if static else None)
        counts.append((_compat.dynamo_compile_count() - before, kvpass.counters["graphs"]))
    assert counts[0] == counts[1], counts
    assert counts[1][1] <= 3, counts  # prefill, first decode step, then one dynamic-length decode graph


def test_hf_compile_config_path():
    """generate(..., compile_config=CompileConfig(backend="kvpass")) compiles the decode step with kvpass."""
    from transformers import CompileConfig

    model = zoo.build("llama")
    ids, mask = zoo.prompt(1)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             cache_implementation="static")
        config = CompileConfig(backend="kvpass", options={"compiler": "eager"}, mode=None, fullgraph=False)
        config._compile_all_devices = True  # HF auto-compiles only on CUDA unless told otherwise
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             cache_implementation="static", compile_config=config)
    assert torch.equal(out, ref)
    sites = kvpass.report().sites
    assert sites and all(s.status == "rewritten" for s in sites), str(kvpass.report())


def test_backend_found_through_entry_point_without_import():
    code = ("import torch, torch.nn.functional as F\n"
            "q = torch.randn(1, 2, 3, 8)\n"
            "f = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q), backend='kvpass',"
            " options={'compiler': 'eager'})\n"
            "torch.testing.assert_close(f(q), F.scaled_dot_product_attention(q, q, q))\n"
            "import kvpass\n"
            "print(len(kvpass.report().rewritten))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "1"


def test_kvpass_log_prints_report_at_compile_time(monkeypatch, caplog):
    monkeypatch.setenv("KVPASS_LOG", "1")
    q = torch.randn(1, 2, 3, 8)
    with caplog.at_level(logging.INFO, logger="kvpass"):
        torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q), backend="kvpass",
                      options={"compiler": "eager"})(q)
    assert "kvpass graph 0: 1 attention site(s)" in caplog.text
    assert "rewritten" in caplog.text


def test_report_is_structured_and_printable():
    q = torch.randn(1, 2, 3, 8)
    torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5), backend="kvpass",
                  options={"compiler": "eager"})(q)
    report = kvpass.report()
    assert report.to_dict()["graphs"][0]["sites"][0]["status"] == "left"
    text = str(report)
    assert "dropout" in text and "left" in text
