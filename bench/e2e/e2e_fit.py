"""The largest-batch search of ``bench/e2e/e2e_decode.py --fit-context``, apart from the GPU work it drives.

Filling the GPU costs a prefill of every token it holds, so the search does not climb batch by batch:
peak memory is linear in the batch, two small batches give its slope, the batch predicted to fill
FIT_MARGIN of the GPU is tried, then up to ``tries`` batches an eighth apart above it (while they fit;
one try fewer, as a fill is the costly part) or below it (until one fits). A result whose every try fit
is a lower bound.
"""
from __future__ import annotations

from typing import Callable

# Batch granularity, and the share of the GPU's memory the prediction aims at: the baseline's
# DynamicCache, grown by concatenation, fragments the allocator (1B, 32k, H200: 40 fit at 93 GiB, 48 did not).
FIT_STEP = 8
FIT_MARGIN = 0.9


def largest_fit(attempt: Callable[[int], dict], batches: list[int], total_gib: float, tries: int = 4) -> list[dict]:
    """The rows of ``attempt(batch)`` (a dict with ``fits`` and, when it fits, ``peak_GiB``) in the order tried."""
    rows = [attempt(b) for b in batches[:2]]
    if len(rows) < 2 or not all(r["fits"] for r in rows):
        return rows
    (b1, p1), (b2, p2) = [(r["batch"], r["peak_GiB"]) for r in rows]
    per_batch = max((p2 - p1) / (b2 - b1), 1e-3)
    guess = max(b2, int(b2 + (FIT_MARGIN * total_gib - p2) / per_batch) // FIT_STEP * FIT_STEP)
    row = attempt(guess)
    rows.append(row)
    step = max(FIT_STEP, guess // 8 // FIT_STEP * FIT_STEP)
    direction = step if row["fits"] else -step
    for _ in range(tries - 1 if row["fits"] else tries):
        batch = row["batch"] + direction
        if batch <= b2:
            break
        nxt = attempt(batch)
        rows.append(nxt)
        if nxt["fits"] != row["fits"]:
            break
        row = nxt
    return rows
