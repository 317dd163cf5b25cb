"""kvpass: a torch.compile backend that rewrites attention and its KV-cache update.

    import kvpass
    model.forward = torch.compile(model.forward, backend="kvpass", options={...})
    print(kvpass.report())

Importing kvpass registers the backend (and its custom ops) and nothing else.
"""
from kvpass import _compat
from kvpass.backend import kvpass_backend
from kvpass.options import KVPassOptions, parse_options
from kvpass.report import counters, report, reset

import lowering.ops  # noqa: F401  (registers torch.ops.kvpass.*)

_compat.register_backend_once("kvpass", kvpass_backend)


def stats() -> dict:
    """Run-time statistics: how many attention calls each lowering served (and why CUDA calls fell
    back to torch SDPA), and per attention site what its variant recorded (``lowering.stats``: cache
    bytes held, tokens kept / released / rebuilt, KV blocks read)."""
    import lowering.stats

    return {"attention_calls": dict(lowering.ops.calls), "sites": lowering.stats.snapshot()}


def __getattr__(name: str):
    # kvpass.PackedCache needs transformers, which ``import kvpass`` does not: imported on first use.
    if name == "PackedCache":
        from kvpass.packed_cache import PackedCache

        return PackedCache
    raise AttributeError(f"module 'kvpass' has no attribute {name!r}")


def validate_options(options) -> KVPassOptions:
    """Check options before compiling: ValueError for a bad one, NotImplementedError for one not built yet."""
    return parse_options(options)


__all__ = ["kvpass_backend", "KVPassOptions", "validate_options", "report", "reset", "counters", "stats", "PackedCache"]
__version__ = "0.1.0"
