"""Each way README compiles a Hugging Face model, run as a user would: a fresh Python process, a tiny
random-init Llama (tests/zoo.py), ``model.generate``, then ``kvpass.report()`` and ``kvpass.stats()``.

The three in-place spellings compile every attention site, with module paths as the model names them;
``model = torch.compile(model, backend="kvpass")`` compiles nothing (torch's wrapper hands ``generate`` to
the original model), and kvpass says so, naming the fix, the first time the user looks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys, warnings
sys.path.insert(0, "tests")
import torch, kvpass, zoo

model = zoo.build("llama")
ids, mask = zoo.prompt(1)
expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
options = {"compiler": "eager"}
spelling = sys.argv[1]
if spelling == "kvpass.compile":
    model = kvpass.compile(model, **options)
elif spelling == "model.compile":
    model.compile(backend="kvpass", options=options)
elif spelling == "forward":
    model.forward = torch.compile(model.forward, backend="kvpass", options=options)
elif spelling == "torch.compile(model)":
    model = torch.compile(model, backend="kvpass", options=options)
out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    report, stats = kvpass.report(), kvpass.stats()
print(json.dumps({
    "same_tokens": bool(torch.equal(out, expected)),
    "modules": sorted({s.module for s in report.sites if s.status == "rewritten"}),
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
    "report": str(report),
}))
"""


def run(spelling: str) -> dict:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, spelling], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spelling", ["kvpass.compile", "model.compile", "forward"])
def test_in_place_spellings_compile_every_site_through_generate(spelling):
    result = run(spelling)
    assert result["same_tokens"]
    assert result["modules"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert result["warnings"] == []


def test_compiled_wrapper_generate_compiles_nothing_and_kvpass_says_how_to_fix_it():
    result = run("torch.compile(model)")
    assert result["same_tokens"] and result["modules"] == []
    assert len(result["warnings"]) == 2  # report() and stats()
    for text in result["warnings"] + [result["report"]]:
        assert "torch.compile(model, backend=" in text
        assert 'model.compile(backend="kvpass"' in text and "kvpass.compile(model" in text
