"""Options are validated once, at compile time, with the key and the allowed values in the message."""
from __future__ import annotations

import pytest
import torch

import kvpass
from kvpass.options import KV_BITS, POLICIES, KVPassOptions, implemented, parse_options
from kvpass.variants.packed import spec_of
from lowering.formats import build_format


def test_asl_layers_reach_the_format_spec_as_a_pair():
    opts = parse_options({"policy": "asl", "budget": 64, "asl_layers": [3, 4]})
    assert opts.asl_layers == (3, 4)
    fmt = build_format(spec_of(opts))
    assert (fmt.first_layer, fmt.span) == (3, 4)


def test_no_options_is_exact_default():
    opts = parse_options(None)
    assert opts == KVPassOptions() and opts.is_exact


@pytest.mark.parametrize("options, key", [
    ({"bits": 8}, "bits"),
    ({"kv_bits": 3}, "kv_bits"),
    ({"kv_bits": True}, "kv_bits"),
    ({"policy": "lru"}, "policy"),
    ({"policy": "snapkv", "budget": 0}, "budget"),
    ({"policy": "snapkv"}, "budget"),
    ({"budget": 128}, "budget"),  # a budget without a compressing policy would silently do nothing
    ({"early_exit": -1e-3}, "early_exit"),
    ({"early_exit": "fast"}, "early_exit"),
    ({"mode": "fast"}, "mode"),
    ({"compiler": "tvm"}, "compiler"),
    ({"decode_kernel": 1}, "decode_kernel"),
    ({"policy": "snapkv", "budget": 64, "asl_layers": (1, 2)}, "asl_layers"),  # ASL's alone
    ({"policy": "asl", "budget": 64, "asl_layers": (1,)}, "asl_layers"),
    ({"policy": "asl", "budget": 64, "asl_layers": (-1, 2)}, "asl_layers"),
    ({"policy": "asl", "budget": 64, "asl_layers": (1, 0)}, "asl_layers"),
    ({"policy": "asl", "budget": 64, "asl_layers": (1.5, 2)}, "asl_layers"),
])
def test_bad_option_names_key_and_allowed_values(options, key):
    with pytest.raises(ValueError, match=key) as info:
        kvpass.validate_options(options)
    assert "allowed" in str(info.value)


_AREA = {"kv_bits": "quantized", "policy": "compressed"}


@pytest.mark.parametrize("key, value", [("kv_bits", b) for b in KV_BITS] + [("policy", p) for p in POLICIES])
def test_every_allowed_value_is_built_or_raises_not_implemented(key, value):
    """A value whose scheme or policy is registered validates; a reserved one raises NotImplementedError
    naming the issue area, never a silent no-op."""
    options = {key: value} if key == "kv_bits" or value == "full" else {key: value, "budget": 64}
    if value in implemented()[key]:
        assert getattr(kvpass.validate_options(options), key) == value
    else:
        with pytest.raises(NotImplementedError, match=_AREA[key]):
            kvpass.validate_options(options)


def test_bad_option_fails_at_compile_not_later():
    fn = torch.compile(lambda x: x * 2, backend="kvpass", options={"kv_bits": 3})
    with pytest.raises(Exception) as info:
        fn(torch.ones(3))
    cause = info.value
    while cause.__cause__ is not None or getattr(cause, "inner_exception", None) is not None:
        cause = getattr(cause, "inner_exception", None) or cause.__cause__
    assert isinstance(cause, ValueError) and "kv_bits" in str(cause)
