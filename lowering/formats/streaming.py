"""policy="streaming": attention sinks plus a recent window (StreamingLLM: Xiao, Tian, Chen, Han, Lewis,
"Efficient Streaming Language Models with Attention Sinks", ICLR 2024, arXiv 2309.17453).

Keeps the first ``N_SINK`` attendable tokens of each row (the sinks: models park attention mass on the
first tokens whatever they say) and the most recent ``budget - N_SINK`` tokens. No attention weights are
needed: decode runs the scheme's fused decode attention over the kept tokens.

Score stored per kept token: its logical position (recency), ``SINK`` for a sink. Left padding: the
sinks are the first *attendable* tokens, not the pad positions. Cost per step: a sort of budget + n
keys per (row, KV head) and the gather of the kept rows, O(budget) memory traffic.
"""
from __future__ import annotations

import torch

from lowering.formats import register_format
from lowering.formats.budgeted import BudgetedFormat, Candidates
from lowering.formats.slot_replacement import ReplacesInPlace

N_SINK = 4  # the paper's 4 initial tokens (and kvpress' StreamingLLMPress default)
SINK = torch.finfo(torch.float32).max


@register_format("streaming")
class Streaming(ReplacesInPlace, BudgetedFormat):
    policy = "streaming"

    @property
    def n_sink(self) -> int:
        return min(N_SINK, self.budget - 1)  # at least the newest token stays (budget 1: no sink)

    def score(self, c: Candidates) -> torch.Tensor:
        held = (c.score == SINK) & ~c.is_new & c.visible
        room = self.n_sink - held.sum(-1, keepdim=True)  # sinks still to choose, [B, Hkv, 1]
        fresh = c.visible & c.is_new
        sink_new = fresh & (fresh.cumsum(-1) <= room)
        return c.pos.float().masked_fill(held | sink_new, SINK)
