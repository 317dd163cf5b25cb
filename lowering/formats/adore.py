"""policy="adore": a fixed-budget hot cache with adaptive release and rebuild from a cold store.

Follows ADORE (Zhang, Zou, Luo, Tang, Luo, Li, Li, "Efficient Sparse Attention needs Adaptive Token
Release", Findings of ACL 2024, arXiv 2407.02328) training-free: the paper's GRU controller (fine-tuned
on labels from full attention) is replaced by the attention the tokens actually receive, and its
recompute-from-token-ids rebuild by a compact cold store of the released tokens' keys and values.

Design
    hot   ``budget`` tokens per (row, KV head) in the storage scheme's form (kv_bits), with position and
          score (``lowering.policies``); attention runs over these only.
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
``lowering.scored_decode_attention``, 6.3x the reference at B=8, 2k hot + 30k cold on an H100), a sort of
L scores, and the
copy of the (already copied every step, by the packed design) buffer; attention itself reads budget
tokens. Statistics per site (``kvpass.stats()``): ``kept``, ``released``, ``rebuilt``, ``cold_bytes``.
"""
from __future__ import annotations

import dataclasses

import torch

from lowering import stats
from lowering.formats import register_format
from lowering.policies import (BudgetedFormat, Candidates, by_position, candidate_bias, hot_layout, key_weights,
                               select, take, write_hot)
from lowering.storage.int8 import dequantize_rows, quantize_rows

GAMMA = 0.9  # score memory of ~1 / (1 - GAMMA) = 10 steps: a token unused for 10 steps has lost 65% of its score
WINDOW = 32  # prefill: the last 32 prompt queries score the prompt (SnapKV's and ASL's window)
COLD = ("cold_k", "cold_k_scale", "cold_v", "cold_v_scale", "cold_pos", "cold_score")


@register_format("adore")
class Adore(BudgetedFormat):
    policy = "adore"
    fused_scoring = True
    gamma = GAMMA

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

    def candidates(self, q, old, old_length, new_k, new_v, attn_mask, is_causal, scale, site) -> Candidates:
        """Old hot, then the cold store, then the new tokens (so ``is_new`` stays the last n)."""
        c = super().candidates(q, old, old_length, new_k, new_v, attn_mask, is_causal, scale, site)
        hot_old = min(old_length, self.budget)
        n_hot = hot_old  # candidates before the cold ones
        if old is None or old_length == hot_old:
            c.extra.update(regions=(n_hot, 0), int8=None)
            return c
        cold_k = dequantize_rows(old["cold_k"], old["cold_k_scale"], q.dtype)
        cold_v = dequantize_rows(old["cold_v"], old["cold_v_scale"], q.dtype)
        B, Hkv, n_cold, _ = cold_k.shape
        cold_stored = {name: torch.empty(shape, dtype=dt, device=q.device) for name, (shape, dt) in
                       self.storage.layout(B, Hkv, n_cold, cold_k.shape[-1], cold_v.shape[-1], q.dtype).items()}
        self.storage.append(None, 0, cold_k, cold_v, cold_stored)

        def splice(t, middle):  # insert the cold rows between the old hot and the new candidates
            return torch.cat([t[:, :, :n_hot], middle, t[:, :, n_hot:]], 2)

        # int8 form of every candidate, for the ones released now; the cold ones keep their bytes exactly
        ks, vs = quantize_rows(c.k), quantize_rows(c.v)
        int8 = {"cold_k": splice(ks[0], old["cold_k"]), "cold_k_scale": splice(ks[1], old["cold_k_scale"]),
                      "cold_v": splice(vs[0], old["cold_v"]), "cold_v_scale": splice(vs[1], old["cold_v_scale"])}
        return dataclasses.replace(
            c, k=splice(c.k, cold_k), v=splice(c.v, cold_v),
            stored={name: splice(t, cold_stored[name]) for name, t in c.stored.items()},
            pos=splice(c.pos, old["cold_pos"].long()), score=splice(c.score, old["cold_score"]),
            visible=splice(c.visible, old["cold_score"] > torch.finfo(torch.float32).min),
            extra={"regions": (n_hot, n_cold), "int8": int8, "cold_k": (old["cold_k"], old["cold_k_scale"])})

    def score(self, c: Candidates) -> torch.Tensor:
        if c.extra.get("fused"):  # decode on CUDA: one pass over hot keys and int8 cold codes
            w = c.fused_weights(self.key_segments(c), mean=True)
        else:
            full = c.full and c.extra["regions"][1] == 0
            Lq = c.q.shape[2]
            rows = slice(Lq - min(WINDOW, Lq), Lq) if c.prefill else slice(None)
            bias = candidate_bias(c.attn_mask, c.is_causal, rows, Lq, c.length, c.pos, full, c.q.shape[1])
            w = key_weights(c.q[:, :, rows], c.k, bias, c.scale, mean=True)
        c.extra["weight_now"] = w
        return torch.where(c.is_new, w, self.gamma * c.score + (1 - self.gamma) * w)

    def selection_key(self, c: Candidates, score: torch.Tensor) -> torch.Tensor:
        """max(score, this step's weight) while decoding (module docstring, ``keep``); the score at prefill."""
        if not c.prefill:
            score = torch.maximum(score, c.extra["weight_now"])  # unattendable: -inf in the base key
        return super().selection_key(c, score)

    def protected(self, c: Candidates) -> torch.Tensor:
        return c.newest(self.recent)

    def key_segments(self, c: Candidates) -> list:
        """The candidates' keys for the fused scoring kernel: old hot, the cold store's int8 codes with
        their scales (dequantized in registers, never materialised), new."""
        from lowering.scored_decode_attention import KeySegment

        n_hot, n_cold = c.extra["regions"]
        if not n_cold:
            return [KeySegment(c.k)]
        codes, scales = c.extra["cold_k"]
        return [KeySegment(c.k[:, :, :n_hot]), KeySegment(codes, scales), KeySegment(c.k[:, :, n_hot + n_cold:])]

    def keep(self, c: Candidates, score: torch.Tensor, out) -> None:
        idx, rest = select(self.selection_key(c, score), min(c.length, self.budget))
        write_hot(c, score, idx, out)
        n_hot, n_cold = c.extra["regions"]
        if rest.shape[-1]:
            rest = by_position(c.pos, rest)
            if c.extra["int8"] is None:  # no cold store yet: quantize the released candidates only
                ks, vs = quantize_rows(take(c.k, rest)), quantize_rows(take(c.v, rest))
                cold = {"cold_k": ks[0], "cold_k_scale": ks[1], "cold_v": vs[0], "cold_v_scale": vs[1]}
            else:
                cold = {name: take(t, rest) for name, t in c.extra["int8"].items()}
            for name, t in cold.items():
                out[name].copy_(t)
            out["cold_pos"].copy_(take(c.pos, rest))
            out["cold_score"].copy_(take(score, rest))
        in_cold = lambda i: (i >= n_hot) & (i < n_hot + n_cold)  # noqa: E731
        stats.add(c.site, "released", (~in_cold(rest)).sum())
        stats.add(c.site, "rebuilt", in_cold(idx).sum())
        stats.set_last(c.site, "cold_bytes", sum(out[name].numel() * out[name].element_size() for name in COLD))
