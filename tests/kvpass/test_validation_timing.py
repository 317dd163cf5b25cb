"""When a bad option is caught, and what the user gets: ``kvpass.compile`` raises before compiling;
``model.compile`` / ``torch.compile`` only store options (torch calls a backend first when it compiles a
graph), so the model's first call raises, the plain ValueError naming the key and the allowed values,
not torch's BackendCompilerFailed."""
from __future__ import annotations

import pytest
import torch

import kvpass
import zoo

BAD = [({"kv_bits": 3}, "kv_bits"), ({"polcy": "snapkv"}, "polcy"), ({"policy": "full", "budget": 64}, "budget")]


@pytest.mark.parametrize("options, key", BAD)
def test_kvpass_compile_raises_before_compiling(options, key):
    model = zoo.build("llama")
    with pytest.raises(ValueError, match=key) as info:
        kvpass.compile(model, **options)
    assert "allowed" in str(info.value)
    assert not hasattr(model, "_compiled_call_impl") or model._compiled_call_impl is None


@pytest.mark.parametrize("spelling", ["model.compile", "torch.compile(forward)"])
@pytest.mark.parametrize("options, key", BAD[:1])
def test_other_spellings_raise_the_value_error_at_the_first_call(spelling, options, key):
    model = zoo.build("llama")
    ids, mask = zoo.prompt(1)
    if spelling == "model.compile":
        model.compile(backend="kvpass", options=options)  # accepted: torch stores the options
    else:
        model.forward = torch.compile(model.forward, backend="kvpass", options=options)
    with pytest.raises(ValueError, match=key) as info:
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert "allowed" in str(info.value)
    assert "BackendCompilerFailed" not in type(info.value).__name__


def test_kvpass_compile_refuses_the_torch_compile_wrapper():
    wrapper = torch.compile(zoo.build("llama"), backend="kvpass")
    with pytest.raises(TypeError, match="_orig_mod"):
        kvpass.compile(wrapper)
