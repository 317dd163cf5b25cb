"""The ``early_exit`` option as the formats use it: its tolerance, and bounded attention counted per site
(the bound and its kernel: ``lowering.attention.early_exit``)."""
from __future__ import annotations

from lowering.attention.early_exit.bound import bounded_attention
from lowering.core import stats

DEFAULT_TOLERANCE = 1e-3  # early_exit=True; ART's direction test uses 1e-3 too


def resolve_tolerance(value) -> float | None:
    """The option's meaning: None (off), True (``DEFAULT_TOLERANCE``) or a tolerance in [0, 1)."""
    if value is None or value is False:
        return None
    return DEFAULT_TOLERANCE if value is True else float(value)


def count_blocks(site: str, total, read=None) -> None:
    """Record a decode step's blocks in ``site``'s stats (``read`` None: every block was read)."""
    stats.add(site, "blocks_read", total if read is None else read)
    stats.add(site, "blocks_total", total)


def attend_and_count(q, k, v, summaries: dict, attn_mask, scale: float | None, tol: float, site: str):
    """``bounded_attention``, its blocks counted in ``site``'s stats -> the output."""
    out, read, total = bounded_attention(q, k, v, summaries, attn_mask, scale, tol)
    count_blocks(site, total, read)
    return out
