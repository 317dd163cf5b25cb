"""policy="snapkv": prompt tokens chosen by an observation window (SnapKV: Li, Huang, Yang, Venkitesh,
Locatelli, Ye, Cai, Lewis, Chen, "SnapKV: LLM Knows What You are Looking for Before Generation",
NeurIPS 2024, arXiv 2404.14469).

Prefill: score every candidate by the attention weights from the last ``WINDOW`` prompt queries (causal
inside the window as the model's mask says), summed over those queries and over the query heads of its
KV head (GQA), max-pooled over ``KERNEL`` neighbouring positions (keeps the neighbours of a hit, so the
kept spans read as text); keep the top ``budget`` per KV head, the window's own tokens always included.

Window: ``observation_window(budget)`` = min(``WINDOW``, budget // 8), at least 1. The window's tokens are
always kept, so a window as large as the budget selects nothing (only the last tokens are kept).
At most an eighth of the budget leaves 7/8 to the scores; it gives the paper's 32 from a budget of 256
up, and 8 at budget 64, the window PyramidKV's harness (KVCache-Factory) uses for budgets 64-2048.

Decode: the prefill selection stays and a sliding recent region of ``decode_recent(budget)`` tokens is
always kept. SnapKV itself compresses the prompt only and lets the cache grow while decoding; a fixed
budget must evict, and the tokens being written are what the next ones depend on most. Decode tokens get
score 0 (SnapKV computes no weights after prefill: decode stays the scheme's fused attention), so once
one slides out of the recent region it is the first evicted, before any token of the prefill selection;
while the region fills, the prefill selection loses its weakest first (at most ``decode_recent`` of them).
The region is half the budget, H2O's balanced split (a region as small as the observation window lost
most of the perplexity the budget could keep; bench/RESULTS.md).

Cost: prefill scoring reads the keys once more for WINDOW queries (WINDOW x L weights per query head).
"""
from __future__ import annotations

import torch

from lowering.formats import register_format
from lowering.formats.budgeted import BudgetedFormat, Candidates
from lowering.formats.slot_replacement import ReplacesInPlace

WINDOW = 32  # the SnapKV paper's default observation window (kvpress uses 64)
KERNEL = 7  # max-pool width; the paper uses 5 to 7 (kvpress 5)
WINDOW_SHARE = 8  # the window takes at most 1/8 of the budget (module docstring)
RECENT_SHARE = 2  # while decoding, the newest half of the budget is kept, as H2O splits it (module docstring)


def observation_window(budget: int) -> int:
    """Observation window (protected at prefill) for a budget: see the module docstring."""
    return max(1, min(WINDOW, budget // WINDOW_SHARE))


def decode_recent(budget: int) -> int:
    """The recent region protected while decoding: see the module docstring."""
    return max(observation_window(budget), budget // RECENT_SHARE)


@register_format("snapkv")
class SnapKV(ReplacesInPlace, BudgetedFormat):
    policy = "snapkv"
    kernel = KERNEL

    def window_size(self, c: Candidates) -> int:
        """Observation window at prefill, the protected recent region while decoding."""
        if c.prefill:
            return min(observation_window(self.budget), c.q.shape[2])
        return decode_recent(self.budget)

    def score(self, c: Candidates) -> torch.Tensor:
        if not c.prefill:
            return c.score  # new tokens: 0
        return c.window_scores(self.window_size(c), pool="max", kernel=self.kernel)

    def protected(self, c: Candidates) -> torch.Tensor:
        return c.newest(self.window_size(c))
