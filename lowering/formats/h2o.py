"""policy="h2o": heavy hitters by accumulated attention plus a recent window (H2O: Zhang, Sheng, Zhou,
Chen, Zheng, Cai, Song, Tian, Re, Barrett, Wang, Chen, "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", NeurIPS 2023, arXiv 2306.14048).

Score of a token: the attention weight it has received, summed over the queries that saw it (every prompt
query at prefill, each decode query since) and over the query heads of its KV head (GQA: one selection
per KV head). The newest ``budget - budget // 2`` tokens are always kept (the paper's balanced split:
half heavy hitters, half recent); the rest of the budget goes to the highest scores.

Cost: decode computes the weights over budget + 1 keys; on CUDA with kv_bits=16 in one pass over the
keys that also leaves the scores the attention over the kept tokens reuses (``lowering.attention.scored``),
elsewhere explicitly (reference path: q.K softmax in fp32, one extra read of the hot keys next to the
fused decode attention); prefill sums weights over all
queries in chunks of <= 2^26 fp32 weights (``lowering.formats.budgeted.SCORE_CHUNK_ELEMENTS``).
"""
from __future__ import annotations

import torch

from lowering.formats import register_format
from lowering.formats.budgeted import BudgetedFormat, Candidates


@register_format("h2o")
class HeavyHitters(BudgetedFormat):
    policy = "h2o"
    fused_scoring = True

    @property
    def recent(self) -> int:
        return self.budget - self.budget // 2

    def score(self, c: Candidates) -> torch.Tensor:
        return c.score + c.weights()

    def protected(self, c: Candidates) -> torch.Tensor:
        return c.newest(self.recent)
