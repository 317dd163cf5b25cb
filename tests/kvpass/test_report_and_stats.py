"""What ``kvpass.report()`` and ``kvpass.stats()`` say: module paths as the model names them, one summary
line per kind of site, byte figures in every mode, a packed cache's bytes accounted for per section."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import kvpass
import zoo
from kvpass.patterns.fx_utils import qualified_name
from kvpass.report import fold_modules


@pytest.mark.parametrize("source, path", [
    ("L['args'][0].model.layers.0.self_attn", "model.layers.0.self_attn"),  # model.compile, HF's wrapped forward
    ("L['self'].model.layers.0.self_attn", "model.layers.0.self_attn"),
    ("L['self'].model.layers[3].self_attn", "model.layers.3.self_attn"),
    ("L['self']._modules['model']._modules['layers']._modules['3']", "model.layers.3"),
    ("self.transformer.h.1.attn", "transformer.h.1.attn"),
    ("L['self']", ""),
])
def test_module_paths_drop_dynamos_source_root(source, path):
    assert qualified_name(source) == path


@given(st.lists(st.integers(0, 40), min_size=1, max_size=40))
@example([0, 1, 3, 5, 6, 7])
def test_folded_modules_list_every_layer_once(layers):
    folded = fold_modules([f"model.layers.{i}.self_attn" for i in layers])
    assert folded.startswith("model.layers.") and folded.endswith(".self_attn")
    inner = folded[len("model.layers."):-len(".self_attn")].strip("{}")
    listed = []
    for part in inner.split(","):
        lo, _, hi = part.partition("..")
        listed += range(int(lo), int(hi or lo) + 1)
    assert listed == sorted(set(layers))


def _generate(options, length=40, new=6):
    model = zoo.build("llama")
    ids = torch.randint(1, zoo.VOCAB, (1, length), generator=torch.Generator().manual_seed(0))
    kvpass.compile(model, compiler="eager", **options)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True)
    return out, kvpass.stats()["sites"]


def test_exact_mode_reports_the_models_own_cache_bytes():
    out, sites = _generate({})
    assert sorted(sites) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for layer, name in zip(out.past_key_values.layers, sorted(sites)):
        held = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        # HF appends a step's keys before attention reads them: the last step read the cache generate returns.
        assert sites[name]["cache_bytes"] == held
        assert sites[name]["tokens"] == layer.keys.shape[2]


@pytest.mark.parametrize("options", [{"kv_bits": 8}, {"kv_bits": 4}, {"kv_bits": 8, "early_exit": True},
                                     {"kv_bits": 8, "policy": "h2o", "budget": 16}])
def test_packed_bytes_are_sections_plus_slack_and_match_the_cache(options):
    out, sites = _generate(options)
    held = {layer.keys.untyped_storage().nbytes() for layer in out.past_key_values.layers}
    for figures in sites.values():
        assert figures["cache_bytes"] == sum(figures["section_bytes"].values()) + figures["capacity_slack_bytes"]
        assert figures["capacity_slack_bytes"] >= 0
        assert figures["cache_bytes"] in held


def test_summary_has_one_line_per_kind_of_site():
    _generate({"kv_bits": 8})
    report = kvpass.report()
    lines = report.summary().splitlines()
    assert len(lines) == 2 * len(report.graphs)  # a header and one kind of site per graph
    assert all("2 x model.layers.{0,1}.self_attn" in line for line in lines[1::2])


def test_nothing_compiled_warns_with_the_fix():
    with pytest.warns(kvpass.NothingCompiledWarning, match=r"model\.compile\(backend=\"kvpass\""):
        text = str(kvpass.report())
    assert "kvpass.compile(model" in text
    with pytest.warns(kvpass.NothingCompiledWarning):
        kvpass.stats()


def test_no_warning_once_something_compiled():
    _generate({})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a NothingCompiledWarning would raise here
        report, stats = kvpass.report(), kvpass.stats()
    assert report.graphs and stats["sites"]
