"""policy="adore": a fixed-budget hot cache with adaptive release and rebuild from a cold store.

Follows ADORE (Zhang, Zou, Luo, Tang, Luo, Li, Li, "Efficient Sparse Attention needs Adaptive Token
Release", Findings of ACL 2024, arXiv 2407.02328) training-free: the paper's GRU controller (fine-tuned
on labels from full attention) is replaced by the attention the tokens actually receive, and its
recompute-from-token-ids rebuild by a compact cold store of the released tokens' keys and values.

Design
    hot   ``budget`` tokens per (row, KV head) in the storage scheme's form (kv_bits), with position and
          score (``lowering.formats.budgeted``); attention runs over these only.
    cold  every released token: int8 keys and values with one fp32 scale per row
          (``lowering.storage.int8.quantize_rows``), its position (int32) and score (fp32).
    score an exponential moving average of the attention weight a token receives, summed over the query
          heads of its KV head: s <- GAMMA s + (1 - GAMMA) w; a new token starts at its first weight.
          Each step, w is computed for hot *and* cold tokens in one softmax over all L tokens, exact
          keys for the hot ones, int8 keys for the cold ones (the cheap estimate q . k_cold). At prefill
          w is the mean weight from the last ``WINDOW`` prompt queries (one decode step's scale).
    keep  the selection key of a decode step is max(s, w): the tokens the current query attends most
          (the ideal top-K sparse attention ADORE approximates; w is what its controller predicts) or
          that were attended recently (s, which keeps the set from churning on one step's noise). By s
          alone a cold token that becomes dominant needed several steps to climb (0.1 w per step) and
          the query that needed it attended without it.
    step  keep the top ``budget`` selection keys of all L tokens (the newest ``recent`` always kept): a hot token
          that falls out is *released* to the cold store, a cold token that beats the least important hot
          token is *rebuilt* into the hot cache (a swap; the layout only depends on L and the budget, so
          every release at a full cache pairs with a rebuild or the new token's entry). Then attend over
          the hot tokens with the scheme's decode attention. Rebuilt keys and values carry int8 rounding
          (<= half a step of 1/127 of the row's largest magnitude); the paper's rebuilt KV is approximate
          too (a re-fed token sees the sparse cache).

Memory per (row, KV head): budget tokens in the scheme's form + 8 bytes each (position, score), plus
(L - budget) * (Dk + Dv + 16) bytes of cold store: at D = 128 and bf16 a cold token costs 272 B against
512 B kept in full, so with L >> budget the cache is ~53% of the full one; it is the price of being able
to rebuild any token (host memory or lower bits would cut it further).

Time per decode step: one pass over the cold int8 keys (L - budget rows, a quarter of the full cache's
K+V bytes at bf16) for the scores, the hot keys once more for their weights (on CUDA with kv_bits=16 one
fused pass reads hot keys and int8 cold codes once and the attention reuses its scores:
``lowering.attention.scored``), a sort of
L scores, and the int8 rewrite of the cold store into the step's new buffer (the packed design copies it
every step); attention itself reads budget tokens. Cold rows are otherwise left where they are
(``FormatSpec.adore_lazy_cold_rows``): only the rebuilt ones are dequantized and stored in the hot form, and
the released rows are spliced as int8 codes, so no step materialises the cold store at full precision (the reference
scoring's dequantized keys aside).
Statistics per site (``kvpass.stats()``): ``kept``, ``released``, ``rebuilt``, ``cold_bytes``.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from lowering.core import stats
from lowering.core.operands import KeySegment
from lowering.core.packed import MOVED_AS_BYTES
from lowering.formats import launch, register_format
from lowering.formats.budgeted import (
    NEVER,
    BudgetedFormat,
    Candidates,
    by_position,
    candidate_bias,
    hot_layout,
    key_weights,
    select,
    take,
    write_hot,
)
from lowering.formats.snapkv import WINDOW  # prefill: the last prompt queries score the prompt, as SnapKV's
from lowering.storage import State
from lowering.storage.int8 import dequantize_rows

GAMMA = 0.9  # score memory of ~1 / (1 - GAMMA) = 10 steps: a token unused for 10 steps has lost 65% of its score
COLD = ("cold_k", "cold_k_scale", "cold_v", "cold_v_scale", "cold_pos", "cold_score")


def _splice(t: torch.Tensor, middle: torch.Tensor, at: int) -> torch.Tensor:
    """Rows ``middle`` inserted into t [B, H, N, ...] before row ``at`` (the cold rows between old hot and new)."""
    return torch.cat([t[:, :, :at], middle, t[:, :, at:]], 2)


def _where_rows(pick: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` where ``pick`` [B, H, K], else of ``b`` (both [B, H, K, ...])."""
    if a.dtype in MOVED_AS_BYTES:  # no where kernel for float8: choose the bytes
        return _where_rows(pick, a.view(torch.uint8), b.view(torch.uint8)).view(a.dtype)
    return torch.where(pick.reshape(*pick.shape, *([1] * (a.dim() - 3))), a, b)


@dataclasses.dataclass
class AdoreCandidates(Candidates):
    """ADORE's candidates: old hot ``n_hot``, then ``n_cold`` cold, then the new ones (``Adore.candidates``).

    int8: every candidate in cold-store form (State of the ``cold_k``, ``cold_k_scale``, ``cold_v``,
    ``cold_v_scale`` sections over the C candidates; None while there is no cold store); spliced: the cold rows
    are dequantized into ``k``, ``v`` and ``stored`` too; cold_k, cold_v: the cold store's (int8 codes
    [B, Hkv, n_cold, D], fp32 scales [B, Hkv, n_cold]); weight_now: this step's weights [B, Hkv, C] (``score``)."""

    n_hot: int = 0
    n_cold: int = 0
    int8: State | None = None
    spliced: bool = False
    cold_k: tuple[torch.Tensor, torch.Tensor] | None = None
    cold_v: tuple[torch.Tensor, torch.Tensor] | None = None
    weight_now: torch.Tensor | None = None


def _adore_candidates(c: Candidates, **fields) -> AdoreCandidates:
    return AdoreCandidates(**{f.name: getattr(c, f.name) for f in dataclasses.fields(Candidates)}, **fields)


@register_format("adore")
class Adore(BudgetedFormat):
    policy = "adore"
    fused_scoring = True
    gamma = GAMMA
    # Decode steps leave the cold rows in the cold store: the candidates' k, v and stored sections hold the
    # old hot and new tokens only, the cold keys are dequantized for reference scoring alone (the fused
    # kernel reads their codes) and only the rebuilt rows are converted to the hot form, O(budget) rows per
    # step instead of O(L). A prefill over a compressed cache attends over every candidate, so it splices
    # every cold row in; ``FormatSpec.adore_lazy_cold_rows=False`` does that on every step (the tests compare
    # the two).

    @property
    def recent(self) -> int:
        return max(1, self.budget // 8)  # the newest tokens have one weight or none yet: keep 1/8 of the budget

    def layout(self, batch, kv_heads, length, k_dim, v_dim, dtype):
        hot = torch.sym_min(length, self.budget)
        cold = length - hot
        layout = hot_layout(self.storage, batch, kv_heads, hot, k_dim, v_dim, dtype)
        rows = (batch, kv_heads, cold)
        layout.update(cold_k=((*rows, k_dim), torch.int8), cold_k_scale=(rows, torch.float32),
                      cold_v=((*rows, v_dim), torch.int8), cold_v_scale=(rows, torch.float32),
                      cold_pos=(rows, torch.int32), cold_score=(rows, torch.float32))
        return layout

    def candidates(self, q, old, old_length, new_k, new_v, attn_mask, is_causal, scale, site) -> AdoreCandidates:
        """Old hot, then the cold store, then the new tokens (so ``is_new`` stays the last n). The cold rows
        themselves stay in the cold store unless the step is a prefill or ``spec.adore_lazy_cold_rows`` is off (class
        docstring): ``c.k``, ``c.v`` and ``c.stored`` then hold the old hot and new candidates only."""
        c = super().candidates(q, old, old_length, new_k, new_v, attn_mask, is_causal, scale, site)
        n_hot = min(old_length, self.budget)  # candidates before the cold ones
        if old is None or old_length == n_hot:
            return _adore_candidates(c, n_hot=n_hot)
        n_cold = old["cold_k"].shape[2]
        splice = functools.partial(_splice, at=n_hot)
        # int8 form of every candidate, for the ones released now; the cold ones keep their bytes exactly
        ks, vs = launch.int8_rows(c.k), launch.int8_rows(c.v)
        int8 = {"cold_k": splice(ks[0], old["cold_k"]), "cold_k_scale": splice(ks[1], old["cold_k_scale"]),
                "cold_v": splice(vs[0], old["cold_v"]), "cold_v_scale": splice(vs[1], old["cold_v_scale"])}
        c = _adore_candidates(
            dataclasses.replace(c, pos=splice(c.pos, old["cold_pos"].long()), score=splice(c.score, old["cold_score"]),
                                visible=splice(c.visible, old["cold_score"] > NEVER)),
            n_hot=n_hot, n_cold=n_cold, int8=int8, cold_k=(old["cold_k"], old["cold_k_scale"]),
            cold_v=(old["cold_v"], old["cold_v_scale"]))
        return self._splice_cold_rows(c) if c.prefill or not self.spec.adore_lazy_cold_rows else c

    def _splice_cold_rows(self, c: AdoreCandidates) -> AdoreCandidates:
        """``c`` with every cold row dequantized into ``k``, ``v`` and ``stored`` (O(L) per step)."""
        n_hot = c.n_hot
        cold_k, cold_v = self._cold_rows(c, None)
        stored = self._stored_form(cold_k, cold_v)
        return dataclasses.replace(c, k=_splice(c.k, cold_k, n_hot), v=_splice(c.v, cold_v, n_hot),
                                   stored={name: _splice(t, stored[name], n_hot) for name, t in c.stored.items()},
                                   spliced=True)

    def _cold_rows(self, c: AdoreCandidates, idx: torch.Tensor | None, keys_only: bool = False) -> tuple:
        """The cold rows ``idx`` [B, Hkv, K] (all of them for None) of the keys and values (keys only), dequantized."""
        pick = (lambda t: t) if idx is None else (lambda t: take(t, idx))  # noqa: E731
        stores = (c.cold_k,) if keys_only else (c.cold_k, c.cold_v)
        return tuple(dequantize_rows(pick(codes), pick(scales), c.q.dtype) for codes, scales in stores)

    def _stored_form(self, k: torch.Tensor, v: torch.Tensor) -> State:
        """Rows k, v [B, Hkv, K, D] in the hot storage scheme's sections."""
        B, Hkv, n = k.shape[:3]
        out = {name: torch.empty(shape, dtype=dt, device=k.device)
               for name, (shape, dt) in self.storage.layout(B, Hkv, n, k.shape[-1], v.shape[-1], k.dtype).items()}
        launch.append(self.storage, None, 0, k, v, out)
        return out

    def _keys(self, c: AdoreCandidates) -> torch.Tensor:
        """Keys of every candidate (the cold ones dequantized from their int8 rows), for reference scoring."""
        if not c.n_cold or c.spliced:
            return c.k
        return _splice(c.k, self._cold_rows(c, None, keys_only=True)[0], c.n_hot)

    def _kept_rows(self, c: AdoreCandidates, idx: torch.Tensor) -> State:
        """Stored sections of the kept candidates ``idx`` [B, Hkv, K] when the cold rows were not spliced: old
        hot and new ones taken from ``c.stored``, rebuilt cold ones converted from their int8 rows, only
        those (O(budget)). Row for row what the spliced candidates hold: dequantizing and storing is per row."""
        n_hot, n_cold = c.n_hot, c.n_cold
        in_cold = (idx >= n_hot) & (idx < n_hot + n_cold)
        local = torch.where(idx >= n_hot + n_cold, idx - n_cold, idx).clamp(max=c.k.shape[2] - 1)
        rebuilt = self._stored_form(*self._cold_rows(c, (idx - n_hot).clamp(0, n_cold - 1)))
        return {name: _where_rows(in_cold, rebuilt[name], take(t, local)) for name, t in c.stored.items()}

    def score(self, c: AdoreCandidates) -> torch.Tensor:
        if c.fused:  # decode on CUDA: one pass over hot keys and int8 cold codes
            w = c.fused_weights(self.key_segments(c), mean=True)
        else:
            full = c.full and c.n_cold == 0
            Lq = c.q.shape[2]
            rows = slice(Lq - min(WINDOW, Lq), Lq) if c.prefill else slice(None)
            bias = candidate_bias(c.attn_mask, c.is_causal, rows, Lq, c.length, c.pos, full, c.q.shape[1])
            w = key_weights(c.q[:, :, rows], self._keys(c), bias, c.scale, mean=True)
        c.weight_now = w
        return torch.where(c.is_new, w, self.gamma * c.score + (1 - self.gamma) * w)

    def selection_key(self, c: AdoreCandidates, score: torch.Tensor) -> torch.Tensor:
        """max(score, this step's weight) while decoding (module docstring, ``keep``); the score at prefill."""
        if not c.prefill:
            score = torch.maximum(score, c.weight_now)  # unattendable: -inf in the base key
        return super().selection_key(c, score)

    def protected(self, c: Candidates) -> torch.Tensor:
        return c.newest(self.recent)

    def key_segments(self, c: AdoreCandidates) -> list[KeySegment]:
        """The candidates' keys for the fused scoring kernel: old hot, the cold store's int8 codes with
        their scales (dequantized in registers, never materialised), new."""
        n_hot, n_cold = c.n_hot, c.n_cold
        if not n_cold:
            return [KeySegment(c.k)]
        codes, scales = c.cold_k
        new = c.k[:, :, n_hot + n_cold:] if c.spliced else c.k[:, :, n_hot:]
        return [KeySegment(c.k[:, :, :n_hot]), KeySegment(codes, scales), KeySegment(new)]

    def keep(self, c: AdoreCandidates, score: torch.Tensor, out) -> None:
        idx, rest = select(self.selection_key(c, score), min(c.length, self.budget))
        lazy = c.n_cold and not c.spliced
        write_hot(c, score, idx, out, functools.partial(self._kept_rows, c) if lazy else None)
        n_hot, n_cold = c.n_hot, c.n_cold
        if rest.shape[-1]:
            rest = by_position(c.pos, rest)
            if c.int8 is None:  # no cold store yet: quantize the released candidates only
                ks, vs = launch.int8_rows(take(c.k, rest)), launch.int8_rows(take(c.v, rest))
                cold = {"cold_k": ks[0], "cold_k_scale": ks[1], "cold_v": vs[0], "cold_v_scale": vs[1]}
            else:
                cold = {name: take(t, rest) for name, t in c.int8.items()}
            for name, t in cold.items():
                out[name].copy_(t)
            out["cold_pos"].copy_(take(c.pos, rest))
            out["cold_score"].copy_(take(score, rest))
        in_cold = lambda i: (i >= n_hot) & (i < n_hot + n_cold)  # noqa: E731
        stats.add(c.site, "released", (~in_cold(rest)).sum())
        stats.add(c.site, "rebuilt", in_cold(idx).sum())
        stats.set_last(c.site, "cold_bytes", sum(out[name].numel() * out[name].element_size() for name in COLD))
