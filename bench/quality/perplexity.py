"""Perplexity through the cache: a prefix prefilled, the rest teacher-forced one token per decode step.

Scoring only a prefill would hide what a cache variant does at decode time (quantizing each new
token's K/V, evicting as the cache grows), so every scored token after the prefix goes through the
cache as a decode step. Texts are windows of the standard-library prose (``corpus.py``).
"""

from __future__ import annotations

import math
import random

import torch

from . import corpus
from .decode import teacher_forced_nll


def make_texts(tokenizer, n_texts: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n_texts`` windows of exactly ``length`` tokens of the corpus, at seed-chosen, disjoint offsets."""
    stream = tokenizer("\n\n".join(corpus.paragraphs()), add_special_tokens=False)["input_ids"]
    slots = len(stream) // length
    if slots < n_texts:
        raise ValueError(f"corpus has {len(stream)} tokens: room for {slots} texts of {length}, not {n_texts}")
    picks = sorted(random.Random(f"{seed}:ppl:{length}").sample(range(slots), n_texts))
    return [list(stream[i * length : (i + 1) * length]) for i in picks]


def perplexity(forward, model, texts: list[list[int]], prefix: int, batch_size: int) -> dict:
    """Perplexity of every token after ``prefix`` in ``texts``; NaN or inf logits make it NaN, never pass."""
    nll_sum, tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        ids = torch.tensor(texts[start : start + batch_size])
        nll = teacher_forced_nll(forward, model, ids, prefix)
        nll_sum += nll.sum().item()
        tokens += nll.numel()
    return {"nll_sum": nll_sum, "tokens": tokens, "ppl": math.exp(nll_sum / tokens)}
