"""Run-time statistics: per attention site (tokens kept, released, rebuilt, blocks read, bytes held), and
``calls``, which lowering served each exact-attention call.

Ops add to them as they run. A value may be a device tensor: it is accumulated on the device and only
read back when :func:`snapshot` is called (``kvpass.stats()``), so a decode step never waits on the
host for a statistic. Not updated on CUDA-graph replays (no Python runs then).
"""
from __future__ import annotations

import threading
from collections import Counter, defaultdict

import torch

# Run-time counts of which lowering served each call ("triton_decode", "torch_sdpa", and
# "torch_sdpa: <why not the kernel>" on CUDA). Plain dict updates: noise next to a kernel launch.
calls: Counter = Counter()

_lock = threading.Lock()
_totals: dict[str, dict[str, float | torch.Tensor]] = defaultdict(dict)
_last: dict[str, dict[str, float | torch.Tensor]] = defaultdict(dict)


def add(site: str, name: str, value) -> None:
    """Accumulate ``value`` (number or tensor, summed) into ``site``'s counter ``name``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().sum()
    with _lock:
        prev = _totals[site].get(name)
        _totals[site][name] = value if prev is None else prev + value


def set_last(site: str, name: str, value) -> None:
    """Record the latest value of a gauge (e.g. bytes the site's cache holds now)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().clone()
    with _lock:
        _last[site][name] = value


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def snapshot() -> dict[str, dict]:
    """{site: {name: value}} with totals and latest gauges, as plain Python numbers."""
    with _lock:
        sites = set(_totals) | set(_last)
        return {s: {**{k: _plain(v) for k, v in _totals[s].items()}, **{k: _plain(v) for k, v in _last[s].items()}}
                for s in sorted(sites)}


def clear() -> None:
    """Forget the per-site statistics (``calls`` is cleared on its own)."""
    with _lock:
        _totals.clear()
        _last.clear()
