"""policy="asl": adaptive selection layer at prefill, SnapKV for the rest (ASL: Taniguchi, Dong, Onizuka,
Xiao, "Adaptive Layer Selection for Layer-Wise Token Pruning in LLM Inference", ACL 2026 Findings,
arXiv 2601.07667; rule as in its code, summarised in shared/papers.md).

At each prefill layer, the prompt tokens are scored by the attention from the last ``WINDOW`` prompt
queries, smoothed by a width-``KERNEL`` average pool, summed over all heads, and ranked. From layer
``FIRST_LAYER`` on, over the last ``SPAN`` layers, the union U of each layer's top (budget - window)
tokens is taken and the mean over U of the variance of their ranks across those layers computed; divided
by the same quantity at ``FIRST_LAYER``, it measures how far the ranking still moves. At the first layer
where the ratio drops below ``SETTLE_RATIO`` (per batch row), that layer's ranking is the selection:
its top (budget - window) tokens plus the window, the same tokens for every KV head, and every later
layer of the same forward keeps exactly that set (one-shot).

How the budget applies: the cache layout is a pure function of (L, budget), so every layer keeps
``budget`` tokens. Layers before the selection layer (and every layer of a row whose ranking never
settles) cannot wait for a later layer's decision, so they keep their own SnapKV selection (per KV head,
max-pooled window scores: ``snapkv``) - the paper's "earlier layers keep their full cache unless a SnapKV
budget is also set" with the budget set. Decoding is SnapKV's (prefill selection plus a sliding recent
region). Not done here: the paper also shortens the *sequence* the deeper layers process at prefill, a
whole-graph rewrite beyond an attention site; deeper layers here attend over the whole prompt at prefill
and keep the selection in their cache.

Cross-layer state: layer i needs the ranks of layers i - SPAN + 1 .. i - 1 of the same forward. The op
sees one layer at a time, so the format keeps the forward in progress (``ForwardState``), in site order:
a site seen again, or another batch/length, starts a new forward. Why on the format instance and per
thread: ``build_format`` builds one instance per distinct spec, so a model compiled with other options
(another budget, kv_bits, ...) never shares it, and a forward running in another thread has its own; two
models compiled with the same options run their forwards one after the other in a thread, and the second
one's first layer (a site seen again, or another shape) starts a fresh state. Passing the state through
the op instead would need the graph to carry it between layers, which Dynamo's graph of one layer cannot.
All of it stays on the device (no host sync); it holds SPAN rank vectors [B, L] int64 and one score
vector [B, L]. It assumes the layers of one forward run in order (true for HF generate, compiled or eager).

Constants are the paper's for 32-layer models (Llama-3.1-8B): FIRST_LAYER 10, SPAN 8, SETTLE_RATIO 0.3,
window 32 (at budgets from 256 up; smaller budgets take SnapKV's ``observation_window``, at most 1/8 of
the budget, so the window never is the whole selection). The op does not see the model's depth, so the
first layer and the span are the option ``asl_layers=(first_layer, span)`` (``FormatSpec.asl_layers``;
default the paper's (10, 8): a 30-layer SmolLM2 keeps them, a 2-layer test model needs (1, 2)).

Whether the rule fires on a model: ``bench/asl_rank_spread.py`` prints the ratio per layer (on SmolLM2-135M
it never does, so ASL selects as SnapKV there; bench/RESULTS.md).

Cost: prefill scoring as SnapKV plus, per layer from FIRST_LAYER on, a sort of L scores and a variance
over SPAN x L ranks; decode as SnapKV.
"""
from __future__ import annotations

import dataclasses
import threading

import torch

from lowering.formats import register_format
from lowering.formats.budgeted import Candidates
from lowering.formats.snapkv import SnapKV

FIRST_LAYER = 10
SPAN = 8
SETTLE_RATIO = 0.3
KERNEL = 7  # ASL's average pool width


@dataclasses.dataclass
class ForwardState:
    """What ASL carries from layer to layer within one prefill forward."""

    sites: list = dataclasses.field(default_factory=list)
    ranks: list = dataclasses.field(default_factory=list)  # per layer [B, L] int64, the last SPAN kept
    shape: tuple = ()
    base: torch.Tensor | None = None  # [B] rank variance at FIRST_LAYER
    settled: torch.Tensor | None = None  # [B] bool
    chosen: torch.Tensor | None = None  # [B, L] scores of the selection layer (rows where settled)


def token_ranks(score: torch.Tensor) -> torch.Tensor:
    """[B, L] -> rank of each token, 0 = highest score (stable on ties)."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def rank_spread(ranks: list[torch.Tensor], top: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over U of the variance across layers of the ranks, U the union of each layer's top ``top``.

    ranks: list of [B, L] (one per layer) -> [B] float32; ``tokens``: bool [B, L], the entries that are tokens
    (None: all; a fixed-capacity cache ranks empty slots too, last)."""
    r = torch.stack(ranks).float()  # [S, B, L]
    union = (r < top).any(0)
    if tokens is not None:
        union = union & tokens
    var = r.var(0, unbiased=False) if r.shape[0] > 1 else torch.zeros_like(r[0])
    return (var * union).sum(-1) / union.sum(-1).clamp_min(1)


@register_format("asl")
class ASL(SnapKV):
    policy = "asl"
    settle_ratio = SETTLE_RATIO
    asl_kernel = KERNEL

    def __init__(self, spec, storage):
        super().__init__(spec, storage)
        self.first_layer, self.span = (FIRST_LAYER, SPAN) if spec.asl_layers is None else spec.asl_layers
        self._threads = threading.local()  # .forward: this thread's ForwardState (module docstring)

    @property
    def forward_state(self) -> ForwardState:
        """The forward in progress (or last run) in this thread."""
        if not hasattr(self._threads, "forward"):
            self._threads.forward = ForwardState()
        return self._threads.forward

    def reset(self) -> None:
        """Forget the forward in progress (a new forward is also detected by itself)."""
        self._threads.forward = ForwardState()

    def _forward(self, c: Candidates) -> ForwardState:
        shape = (c.q.shape[0], c.length)
        state = self.forward_state
        if c.site in state.sites or state.shape != shape:
            state = self._threads.forward = ForwardState(shape=shape)
        state.sites.append(c.site)
        return state

    def score(self, c: Candidates) -> torch.Tensor:
        snap = super().score(c)
        if not (c.prefill and c.full):
            return snap  # decode, or a prefill over an already compressed cache: SnapKV's
        w = self.window_size(c)
        layer_score = c.window_scores(w, pool="avg", kernel=self.asl_kernel).sum(1)  # [B, L]: all heads
        layer_score = layer_score.masked_fill(~c.visible.any(1), -torch.inf)
        fw = self._forward(c)
        layer = len(fw.sites) - 1
        fw.ranks = (fw.ranks + [token_ranks(layer_score)])[-self.span:]
        if layer >= self.first_layer:
            spread = rank_spread(fw.ranks, max(self.budget - w, 1))
            if fw.base is None:
                fw.base = spread
                fw.settled = torch.zeros_like(spread, dtype=torch.bool)
                fw.chosen = torch.zeros_like(layer_score)
            else:
                newly = ~fw.settled & (spread <= self.settle_ratio * fw.base)  # <=: base 0 = settled already
                fw.chosen = torch.where(newly[:, None], layer_score, fw.chosen)
                fw.settled = fw.settled | newly
        if fw.settled is None:
            return snap
        chosen = fw.chosen.nan_to_num(neginf=torch.finfo(torch.float32).min)[:, None].expand_as(snap)
        return torch.where(fw.settled[:, None, None], chosen, snap)
