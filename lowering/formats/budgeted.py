"""What the budgeted cache formats share: the kept-set layout, the candidate set of a step, the mask
over kept positions, attention weights for scoring, observation-window scores and top-k selection.

A budgeted format (policies ``streaming``, ``h2o``, ``snapkv``, ``asl``, ``adore``; one module each
under ``lowering.formats``) keeps at most ``budget`` *hot* tokens per (batch row, KV head), in the
storage scheme's own form (``kv_bits``), plus per token its logical position (int32) and a float32
score. The model's logical length L stays the slot's, so HF computes RoPE positions of new tokens from
the full sequence. Layout, a pure function of (L, budget)::

    <scheme sections>  [B, Hkv, hot, ...]   hot = sym_min(L, budget), scheme's rows (k, v, scales)
    pos                [B, Hkv, hot] int32  logical positions of the kept tokens (ascending after a general step)
    score              [B, Hkv, hot] fp32   the policy's score (NEVER: a token no query may attend)

Overhead: 8 bytes per kept token and KV head (3% of a bf16 K+V row at D=128). ADORE adds a cold store.

One step (``BudgetedFormat.step``), for the C = hot_old + n *candidates* (old hot tokens then this
step's; in position order unless slots were replaced in place):

- prefill (query length > 16, or SDPA's top-left ``is_causal``): attend exactly over every candidate
  (the whole prompt on a first prefill, so the output is the full-cache output), then score and keep
  the top ``sym_min(L, budget)``;
- decode: score, keep the top ``budget``, then attend over the kept tokens (new one included) with the
  scheme's decode attention (the fused kernel on CUDA) and HF's mask gathered at their positions; with
  ``early_exit``, with the bounded attention of ``lowering.attention.early_exit`` over them instead (summaries
  rebuilt from the kept rows each step; policies whose fused scoring reads every key read every block).

Selection: key = NEVER for a token no query of its row and KV head can attend (left padding: never
chosen while enough attendable tokens exist), +inf for tokens the policy protects (sinks, recent or
observation window), else the score; the kept set is the top ``hot`` keys, re-sorted by position.
With budget >= L nothing is dropped and the step makes exactly the calls the dense format makes, on the
same tensors and the model's own mask, so the output is bit for bit the full-cache one.
Full hot sets of policies that replace in place decode in place instead (``lowering/formats/slot_replacement.py``).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from lowering.attention import launchers
from lowering.attention.early_exit import bound
from lowering.core import stats
from lowering.core.limits import MASKED_BELOW, MAX_DECODE_QUERY_LEN
from lowering.core.operands import KeySegment, ScoredKeys
from lowering.core.packed import MOVED_AS_BYTES, Layout
from lowering.core.reference import exact_attention
from lowering.formats import FormatSpec, early_exit, launch
from lowering.storage import State, StorageScheme

NEVER = torch.finfo(torch.float32).min  # stored score of a token no query may attend (finite: poison-checkable)
# Prefill scoring by all queries (H2O) works on query chunks holding at most this many fp32 weights:
# 2^26 * 4 B = 256 MB at 32k context instead of Lq * L * Hq * 4 B = 128 GB at once.
SCORE_CHUNK_ELEMENTS = 1 << 26


def per_token(storage: StorageScheme) -> bool:
    """True when every section of the scheme is [B, Hkv, length, ...]: rows can be moved by index."""
    for n in (1, 2):
        for shape, _ in storage.layout(1, 1, n, 8, 8, torch.float16).values():
            if len(shape) < 3 or tuple(shape[:3]) != (1, 1, n):
                return False
    return True


def hot_layout(storage: StorageScheme, batch, kv_heads, hot, k_dim, v_dim, dtype) -> Layout:
    layout = dict(storage.layout(batch, kv_heads, hot, k_dim, v_dim, dtype))
    layout["pos"] = ((batch, kv_heads, hot), torch.int32)
    layout["score"] = ((batch, kv_heads, hot), torch.float32)
    return layout


# ---------------------------------------------------------------------------------------------- masks

def _as_bias(attn_mask: torch.Tensor) -> torch.Tensor:
    """HF mask (bool, True = attend, or additive) -> float32 additive, -inf where masked."""
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=torch.float32, device=attn_mask.device)
        return bias.masked_fill(~attn_mask, -math.inf)
    bias = attn_mask.float()
    return bias.masked_fill(bias < MASKED_BELOW, -math.inf)


def _as_4d(attn_mask: torch.Tensor) -> torch.Tensor:
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask


def plain_causal(mask: torch.Tensor, n: int) -> torch.Tensor:
    """bool device scalar: the first n columns of ``mask`` [B|1, H|1, n, >= n] (bool, or additive: >= MASKED_BELOW
    attends) are the plain causal pattern in every row, no padding. That is the mask of a first step of n tokens
    with no padding, which some transformers versions pass as no mask and SDPA's ``is_causal`` instead: a step under
    it is a prefill either way. False where the mask has other than n rows."""
    if mask.shape[-2] != n:
        return torch.zeros((), dtype=torch.bool, device=mask.device)
    m = mask[..., :n]
    seen = m if m.dtype == torch.bool else m >= MASKED_BELOW
    return (seen == torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()).all()


def mask_rows(attn_mask, is_causal: bool, rows: slice, q_len: int, length: int, device) -> torch.Tensor | None:
    """Float32 additive mask of query ``rows`` over the L logical keys, [B|1, Hq|1, r, L] (None: no mask).

    The rows are cut before the float conversion: a prefill mask [B, 1, L, L] in fp32 is 32 GiB at 8 x 32k."""
    bias = None
    if attn_mask is not None:
        m = _as_4d(attn_mask)
        m = m.expand(*m.shape[:2], q_len, length)[:, :, rows]
        bias = _as_bias(m)
    if is_causal:  # SDPA's top-left alignment: query i sees keys j <= i
        r = torch.arange(q_len, device=device)[rows, None]
        causal = torch.zeros(r.shape[0], length, device=device).masked_fill(torch.arange(length, device=device) > r,
                                                                              -math.inf)[None, None]
        bias = causal if bias is None else bias + causal
    return bias


def gather_columns(bias: torch.Tensor | None, pos: torch.Tensor, q_heads: int) -> torch.Tensor | None:
    """Mask columns at the kept positions: bias [B|1, Hq|1, r, L], pos [B, Hkv, K] -> [B, Hq, r, K]."""
    if bias is None:
        return None
    B, Hkv, K = pos.shape
    r = bias.shape[2]
    idx = pos.long().repeat_interleave(q_heads // Hkv, dim=1)[:, :, None, :].expand(B, q_heads, r, K)
    return bias.expand(B, q_heads, r, bias.shape[-1]).gather(-1, idx)


def gather_model_mask(attn_mask, pos: torch.Tensor, q_heads: int, q_len: int, length: int):
    """The model's own mask (dtype kept) at the kept positions, [B, Hq, Lq, K], for the scheme's attention."""
    if attn_mask is None:
        return None
    m = _as_4d(attn_mask)
    return gather_columns(m.expand(*m.shape[:2], q_len, length), pos, q_heads)


# -------------------------------------------------------------------------------------------- weights

def _safe_softmax(s: torch.Tensor) -> torch.Tensor:
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)  # rows with no key -> 0


def key_weights(q: torch.Tensor, k: torch.Tensor, bias, scale: float, *, mean: bool = False) -> torch.Tensor:
    """Attention weights each key receives, in fp32, summed over the query heads of its KV head and over
    the queries (averaged over queries with ``mean``).

    q [B, Hq, r, D]; k [B, Hkv, C, D]; bias float32 [B|1, Hq|1, r, C] or None -> [B, Hkv, C]. A query row
    with no attended key contributes 0."""
    B, Hq, r, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    s = (q.float().reshape(B, Hkv, Hq // Hkv * r, D) @ k.float().transpose(-1, -2)) * scale
    s = s.reshape(B, Hq, r, C)
    if bias is not None:
        s = s + bias
    w = _safe_softmax(s).reshape(B, Hkv, Hq // Hkv * r, C).sum(2)
    return w / r if mean else w


def all_query_weights(q, k, attn_mask, is_causal, pos, length: int, full: bool, scale: float) -> torch.Tensor:
    """``key_weights`` summed over every query (H2O's accumulated attention), in query chunks."""
    B, Hq, Lq, _ = q.shape
    chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, B * Hq * k.shape[2]))
    total = torch.zeros(B, k.shape[1], k.shape[2], dtype=torch.float32, device=q.device)
    for start in range(0, Lq, chunk):
        rows = slice(start, min(Lq, start + chunk))
        total += key_weights(q[:, :, rows], k, candidate_bias(attn_mask, is_causal, rows, Lq, length, pos, full, Hq),
                             scale)
    return total


def candidate_bias(attn_mask, is_causal, rows: slice, q_len: int, length: int, pos, full: bool, q_heads: int):
    """Float32 additive mask of query ``rows`` over the candidates (the logical keys at ``pos``)."""
    bias = mask_rows(attn_mask, is_causal, rows, q_len, length, pos.device)
    return bias if full or bias is None else gather_columns(bias, pos, q_heads)


def window_scores(q, k, attn_mask, is_causal, pos, length: int, full: bool, scale: float, window: int, *,
                  pool: str, kernel: int, mean: bool = False) -> torch.Tensor:
    """SnapKV's observation-window score per KV head, [B, Hkv, C]: weights from the last ``window``
    queries, summed over them and the query heads of the KV head, pooled over neighbouring keys
    (``pool`` "max" or "avg", width ``kernel``, stride 1, same length)."""
    Lq = q.shape[2]
    rows = slice(Lq - window, Lq)
    bias = candidate_bias(attn_mask, is_causal, rows, Lq, length, pos, full, q.shape[1])
    w = key_weights(q[:, :, rows], k, bias, scale, mean=mean)
    if kernel > 1:
        B, H, C = w.shape
        fn = F.max_pool1d if pool == "max" else F.avg_pool1d
        kwargs = {} if pool == "max" else {"count_include_pad": False}
        w = fn(w.reshape(B * H, 1, C), kernel, stride=1, padding=kernel // 2, **kwargs).reshape(B, H, C)
    return w


# ------------------------------------------------------------------------------------------ the step

@dataclasses.dataclass
class Candidates:
    """The tokens one step chooses from (old hot then new; in position order unless slots were replaced in
    place) and what scoring needs.

    q [B, Hq, Lq, Dk]; k, v [B, Hkv, C, D] in the model dtype (old hot dequantized, new at full
    precision); stored: the scheme's sections [B, Hkv, C, ...]; pos int64 [B, Hkv, C]; score fp32
    [B, Hkv, C] (old scores; NEVER for unattendable, 0 for new); visible bool [B, Hkv, C] (some query of
    the row may attend it); n_new: this step's tokens (the last n_new); length: logical L after the step;
    full: the candidates are all L logical tokens (nothing dropped yet), so pos = arange(L); prefill: the
    step attends exactly over all candidates before selecting. What the step computes on the way:
    fused: the decode weights and attention come from the fused kernels (``BudgetedFormat.use_fused_scoring``);
    scored: the scoring kernel's scores, reused by the attention after selection; kept: the kept candidates'
    indices [B, Hkv, hot] (``write_hot``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    stored: State
    pos: torch.Tensor
    score: torch.Tensor
    visible: torch.Tensor
    attn_mask: torch.Tensor | None
    is_causal: bool
    scale: float
    n_new: int
    length: int
    full: bool
    prefill: bool
    site: str
    fused: bool = False
    scored: ScoredKeys | None = None
    kept: torch.Tensor | None = None

    @property
    def is_new(self) -> torch.Tensor:
        C = self.pos.shape[-1]
        return (torch.arange(C, device=self.pos.device) >= C - self.n_new).expand_as(self.pos)

    def window_scores(self, window: int, **kw) -> torch.Tensor:
        return window_scores(self.q, self.k, self.attn_mask, self.is_causal, self.pos, self.length, self.full,
                             self.scale, window, **kw)

    def weights(self, **kw) -> torch.Tensor:
        """Weights from this step's queries (all of them), [B, Hkv, C]."""
        if self.fused:
            return self.fused_weights([KeySegment(self.k)], **kw)
        if self.q.shape[2] > MAX_DECODE_QUERY_LEN:
            return all_query_weights(self.q, self.k, self.attn_mask, self.is_causal, self.pos, self.length, self.full,
                                     self.scale)
        bias = candidate_bias(self.attn_mask, self.is_causal, slice(None), self.q.shape[2], self.length, self.pos,
                              self.full, self.q.shape[1])
        return key_weights(self.q, self.k, bias, self.scale, **kw)

    def fused_weights(self, segments, *, mean: bool = False) -> torch.Tensor:
        """``weights`` of a decode step from the fused kernel, over the candidates' keys given in column
        ``segments``; the raw scores stay in ``scored`` for the attention after selection."""
        self.scored = launchers.load().scored.score_keys(self.q, segments, self.pos, self.attn_mask, self.scale,
                                                         self.length, mean=mean)
        return self.scored.weights

    def newest(self, count) -> torch.Tensor:
        """bool [B, Hkv, C]: the candidates among the ``count`` newest logical positions."""
        return self.pos >= self.length - count


def visible_tokens(attn_mask, is_causal, q_len: int, length: int, pos: torch.Tensor, q_heads: int) -> torch.Tensor:
    """bool [B, Hkv, n]: some query of the row, in some query head of the KV head, may attend the token."""
    B, Hkv, n = pos.shape
    if attn_mask is not None and not is_causal:  # a reduction over the query rows, no float copy of the mask
        m = _as_4d(attn_mask)
        m = m.expand(*m.shape[:2], q_len, length)
        seen = m.any(2) if m.dtype == torch.bool else m.amax(2) >= MASKED_BELOW  # [B|1, Hq|1, L]
    else:
        bias = mask_rows(attn_mask, is_causal, slice(None), q_len, length, pos.device)
        if bias is None:
            return torch.ones(B, Hkv, n, dtype=torch.bool, device=pos.device)
        seen = (bias > -math.inf).any(2)  # [B|1, Hq|1, L]
    seen = seen.expand(B, q_heads, length).reshape(B, Hkv, q_heads // Hkv, length).any(2)
    return seen.gather(-1, pos.long())


def visible_column(attn_mask, q_len: int, length: int, column: int, kv_heads: int, q_heads: int,
                   device) -> torch.Tensor:
    """``visible_tokens`` (no causal mask) of the one token at ``column`` for every (batch row, KV head),
    bool [B|1, Hkv, 1]: a decode step's new token, from the mask's one column."""
    if attn_mask is None:
        return torch.ones(1, kv_heads, 1, dtype=torch.bool, device=device)
    m = _as_4d(attn_mask)
    m = m.expand(*m.shape[:2], q_len, length)[..., column]  # [B|1, Hq|1, Lq]
    seen = m.any(-1) if m.dtype == torch.bool else m.amax(-1) >= MASKED_BELOW  # [B|1, Hq|1]
    return seen.expand(seen.shape[0], q_heads).reshape(-1, kv_heads, q_heads // kv_heads).any(-1, keepdim=True)


def select(key: torch.Tensor, hot: int, pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, H, N] of the keys in descending order: (first ``hot``, the rest). Equal keys: the lower
    position first given ``pos`` (slots replaced in place are out of position order), else the lower index."""
    if pos is None:
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
        return order[..., :hot], order[..., hot:]
    by_pos = pos.argsort(dim=-1, stable=True)
    order = by_pos.gather(-1, torch.sort(key.gather(-1, by_pos), dim=-1, descending=True, stable=True).indices)
    return order[..., :hot], order[..., hot:]


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of t [B, H, N, ...] at idx [B, H, K] -> [B, H, K, ...]."""
    if t.dtype in MOVED_AS_BYTES:
        return take(t.view(torch.uint8), idx).view(t.dtype)
    return t.gather(2, idx.reshape(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:]))


def by_position(pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``idx`` [B, H, K] reordered so that ``pos`` at it ascends."""
    return idx.gather(-1, take(pos, idx).argsort(-1))


def write_hot(c: Candidates, score: torch.Tensor, idx: torch.Tensor, out: State, rows=None) -> None:
    """Kept candidates ``idx`` [B, Hkv, hot] into ``out`` by position; ``rows(idx)``: their sections (ADORE's cold)."""
    idx = by_position(c.pos, idx)
    c.kept = idx  # the fused path attends over these candidates' stored scores
    for name, t in (rows(idx) if rows else {name: take(t, idx) for name, t in c.stored.items()}).items():
        out[name].copy_(t)
    out["pos"].copy_(take(c.pos, idx))
    out["score"].copy_(take(score, idx))


class BudgetedFormat:
    """Base of the budgeted formats: layout, candidates, selection, attention. A policy sets ``policy``
    and implements ``score`` (and ``protected``); ADORE overrides ``keep`` to add its cold store; policies
    whose decode scores need no rows also take ``slot_replacement.ReplacesInPlace``."""

    policy: str = ""
    fused_scoring: bool = False  # decode weights and attention from one pass over the keys (h2o, adore)

    def __init__(self, spec: FormatSpec, storage: StorageScheme):
        self.tolerance = early_exit.resolve_tolerance(spec.early_exit)
        if spec.budget is None or spec.budget < 1:
            raise ValueError(f"policy {spec.policy!r} needs a positive budget, got {spec.budget!r}")
        if not per_token(storage) and getattr(storage, "per_token_variant", None) is not None:
            storage = storage.per_token_variant  # e.g. int4: per-token rows instead of KIVI's key groups
        if not per_token(storage):
            raise NotImplementedError(
                f"policy {spec.policy!r} with kv_bits={spec.kv_bits!r}: the {storage.name} scheme does not store "
                "one row per token, so kept tokens cannot be moved by index (per-token schemes: 16, 8, fp8, aligned)")
        self.spec, self.storage, self.budget = spec, storage, spec.budget

    # -- layout
    def layout(self, batch, kv_heads, length, k_dim, v_dim, dtype) -> Layout:
        return hot_layout(self.storage, batch, kv_heads, torch.sym_min(length, self.budget), k_dim, v_dim, dtype)

    # -- policy hooks
    def score(self, c: Candidates) -> torch.Tensor:
        """New scores of the candidates, fp32 [B, Hkv, C] (finite; NEVER where not visible is applied after)."""
        raise NotImplementedError

    def protected(self, c: Candidates) -> torch.Tensor | None:
        """bool [B, Hkv, C]: candidates kept whatever their score (at most ``budget`` of them), or None."""
        return None

    # -- the step
    def candidates(self, q, old, old_length, new_k, new_v, attn_mask, is_causal, scale, site) -> Candidates:
        B, Hkv, n, _ = new_k.shape
        length = old_length + n
        hot_old = min(old_length, self.budget)
        new_state = {name: torch.empty(shape, dtype=dt, device=q.device)
                     for name, (shape, dt) in self.storage.layout(B, Hkv, n, new_k.shape[-1], new_v.shape[-1],
                                                                  q.dtype).items()}
        launch.append(self.storage, None, 0, new_k, new_v, new_state)
        new_pos = torch.arange(old_length, length, device=q.device).expand(B, Hkv, n)
        visible_new = visible_tokens(attn_mask, is_causal, q.shape[2], length, new_pos, q.shape[1])
        if old is None or hot_old == 0:
            stored, k, v, pos = new_state, new_k, new_v, new_pos
            score = torch.zeros(B, Hkv, n, device=q.device)
            visible = visible_new
        else:
            old_state = {name: old[name] for name in new_state}
            old_k, old_v = self.storage.dequantize(old_state, hot_old, q.dtype)
            stored = {name: torch.cat([old_state[name], new_state[name]], 2) for name in new_state}
            k, v = torch.cat([old_k, new_k], 2), torch.cat([old_v, new_v], 2)
            pos = torch.cat([old["pos"].long(), new_pos], 2)
            score = torch.cat([old["score"], torch.zeros(B, Hkv, n, device=q.device)], 2)
            visible = torch.cat([old["score"] > NEVER, visible_new], 2)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        # a prefill: long, SDPA's is_causal, or a first step under the plain causal mask (the same step, as other
        # transformers versions give it; one host sync, at the first step only)
        prefill = q.shape[2] > MAX_DECODE_QUERY_LEN or is_causal or (
            old_length == 0 and attn_mask is not None and q.shape[2] == n and bool(plain_causal(_as_4d(attn_mask), n)))
        return Candidates(q, k, v, stored, pos, score, visible, attn_mask, is_causal, scale, n, length,
                          hot_old == old_length, prefill, site)

    def use_fused_scoring(self, c: Candidates) -> bool:
        """Decode steps that drop a token (with nothing dropped the step stays bit for bit the dense
        format's), on CUDA (or as the spec's ``fused_scoring`` says), with keys stored in the model's dtype
        (the scores must be those of the stored rows: kv_bits=16) and a query the kernels take."""
        enabled = c.q.is_cuda if self.spec.fused_scoring is None else self.spec.fused_scoring
        if not (enabled and self.fused_scoring and not c.prefill and c.length > self.budget):
            return False
        if set(c.stored) != {"k", "v"} or c.stored["k"].dtype != c.q.dtype or c.k.shape[-1] != c.v.shape[-1]:
            return False
        if launchers.missing() is not None:
            return False
        return launchers.load().decode.query_unsupported_reason(c.q, c.k.shape[1], c.length, c.attn_mask) is None

    def selection_key(self, c: Candidates, score: torch.Tensor) -> torch.Tensor:
        key = score.clone()
        protect = self.protected(c)
        if protect is not None:
            key = key.masked_fill(protect, math.inf)
        return key.masked_fill(~c.visible, -math.inf)

    def keep(self, c: Candidates, score: torch.Tensor, out: State) -> None:
        """Write the kept tokens (the top keys) into ``out``; the others are dropped."""
        idx, dropped = select(self.selection_key(c, score), min(c.length, self.budget), c.pos)
        write_hot(c, score, idx, out)
        stats.add(c.site, "evicted", dropped.numel())

    def step(self, q, old: State | None, old_length: int, new_k, new_v, attn_mask, is_causal, scale, site: str,
             out: State) -> torch.Tensor:
        c = self.candidates(q, old, old_length, new_k, new_v, attn_mask, is_causal, scale, site)
        c.fused = self.use_fused_scoring(c)
        hot = min(c.length, self.budget)
        result = None
        if c.prefill:  # attend exactly over every candidate, then select
            mask = attn_mask
            if not c.full:  # the model's mask (and causality) at the candidates' positions
                mask = candidate_bias(attn_mask, is_causal, slice(None), q.shape[2], c.length, c.pos, False, q.shape[1])
                mask = None if mask is None else mask.to(q.dtype)
            result = exact_attention(q, c.k, c.v, mask, is_causal and c.full, scale, q.shape[1] != c.k.shape[1])
        score = self.score(c).masked_fill(~c.visible, NEVER)
        self.keep(c, score, out)
        stats.set_last(site, "kept", hot)
        if result is not None:
            return result
        if c.scored is not None:  # the kept tokens' scores are computed: read their values only
            if self.tolerance is not None:  # scoring read every kept key: nothing was left to skip
                early_exit.count_blocks(site, c.k.shape[0] * c.k.shape[1] * bound.num_blocks(hot), None)
            return launchers.load().scored.kept_attention(c.scored, c.kept, out["v"])
        return self.attend_kept(q, {name: out[name] for name in c.stored}, out["pos"], hot, c.length, attn_mask,
                                scale, site)

    def attend_kept(self, q, state: State, pos: torch.Tensor, hot: int, length: int, attn_mask, scale,
                    site: str) -> torch.Tensor:
        """Attention over the ``hot`` kept tokens (sections ``state``), the model's mask gathered at ``pos``."""
        mask = attn_mask if hot == length else gather_model_mask(attn_mask, pos, q.shape[1], q.shape[2], length)
        if self.tolerance is None:
            return launch.decode_attention(self.storage, q, state, hot, mask, scale)
        return self.bounded_decode_attention(q, state, hot, mask, scale, site)

    def bounded_decode_attention(self, q, state: State, hot: int, mask, scale, site: str) -> torch.Tensor:
        """early_exit over the kept tokens (``lowering.attention.early_exit``: the same bound and kernel as the
        dense format). Eviction rewrites and reorders the hot set every step, so its block summaries are
        rebuilt from it each step, O(budget) like the rewrite itself; they summarise the rows attention
        reads (dequantized where the scheme packs them), so the bound stays a proof."""
        if set(state) == {"k", "v"} and state["k"].dtype == q.dtype:
            k, v = state["k"], state["v"]
        else:
            k, v = self.storage.dequantize(state, hot, q.dtype)
        return early_exit.attend_and_count(q, k, v, bound.build_summaries(k, v), mask, scale, self.tolerance, site)
