"""kvpass: a torch.compile backend that rewrites attention and its KV-cache update.

    import kvpass
    kvpass.compile(model, kv_bits=8)      # or: model.compile(backend="kvpass", options={"kv_bits": 8})
    model.generate(...)
    print(kvpass.report())

Importing kvpass registers the backend (and, through its variants, its custom ops) and nothing else.
"""
import torch

from kvpass import _compat
from kvpass.backend import kvpass_backend
from kvpass.options import KVPassOptions, parse_options
from kvpass.report import (
    NOTHING_COMPILED,
    NothingCompiledWarning,
    counters,
    report,
    reset,
    warn_if_nothing_compiled,
)
from lowering.core import packed as lowering_packed
from lowering.core import stats as lowering_stats

_compat.register_backend_once("kvpass", kvpass_backend)


def compile(model, **options):
    """Compile ``model`` (a ``torch.nn.Module``) in place with the kvpass backend and return it.

    ``options`` are the backend's (``kv_bits=8``, ``policy="snapkv", budget=256``, ...), validated now: a
    bad one raises ValueError naming the key and the allowed values before anything is compiled. In place
    (torch's ``model.compile``) so every call of the model goes through the compiled graph, Hugging Face's
    ``model.generate`` included; ``model = torch.compile(model, ...)`` returns a wrapper whose ``generate``
    is the original model's, and nothing would be compiled.
    """
    parse_options(options)
    if _compat.is_compiled_wrapper(model):
        raise TypeError("kvpass.compile: got a torch.compile wrapper (OptimizedModule); pass the model itself "
                        "(its ._orig_mod), which is compiled in place")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"kvpass.compile: expected a torch.nn.Module, got {type(model).__name__}; for a "
                        "function use torch.compile(fn, backend='kvpass', options={...})")
    model.compile(backend="kvpass", options=dict(options))
    return model


def stats() -> dict:
    """Run-time statistics: how many attention calls each lowering served (and why CUDA calls fell
    back to torch SDPA), and per attention site reading a cache what it holds now (``lowering.core.stats``):
    ``cache_bytes`` (the model's own cache tensors in the exact mode; the packed buffer otherwise),
    ``tokens``, and for packed caches ``section_bytes`` (what each section of the layout holds at this
    length: codes, scales, int4's full-precision residual window ``*_res``, early exit's block summaries
    ``ee_*``, a policy's positions and scores) and ``capacity_slack_bytes`` (room laid out for tokens not
    yet appended, plus alignment: a cache grows in place up to its capacity), and what each variant counts
    (tokens kept, released, rebuilt, KV blocks read). Warns (``NothingCompiledWarning``) when no graph
    was compiled with kvpass."""
    warn_if_nothing_compiled()
    sites = lowering_stats.snapshot()
    for figures in sites.values():
        layout = figures.pop("layout", None)
        if layout is not None:
            figures["section_bytes"] = lowering_packed.section_nbytes(layout)
            figures["capacity_slack_bytes"] = figures["cache_bytes"] - sum(figures["section_bytes"].values())
    return {"attention_calls": dict(lowering_stats.calls), "sites": sites}


def validate_options(options) -> KVPassOptions:
    """Check options before compiling: ValueError for a bad one."""
    return parse_options(options)


__all__ = [
    "NOTHING_COMPILED",
    "KVPassOptions",
    "NothingCompiledWarning",
    "compile",
    "counters",
    "kvpass_backend",
    "report",
    "reset",
    "stats",
    "validate_options",
]
__version__ = "0.1.0"
