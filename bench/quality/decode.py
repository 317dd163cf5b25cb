"""Greedy generation and teacher-forced scoring through a model's KV cache, for any forward callable.

``forward`` is ``model.forward`` or ``torch.compile(model.forward, backend="kvpass", options=...)``:
both are called the same way, one prefill then one token per step, so whatever the cache variant
does at decode time is what gets measured. Prompts of one batch have equal length (tasks.py builds
them so), so no padding or attention mask is involved.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def _newline_ids(tokenizer) -> frozenset[int]:
    # Answers are one line: a row is done once it emits a token containing a newline (or EOS).
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    ids = {i for i, t in enumerate(vocab) if t and ("\n" in t or "Ċ" in t)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def greedy(forward, model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int):
    """Greedy continuation of each row of ``input_ids`` [B, L]; stops early once every row ended a line.

    ``tokenizer`` may be None (no early stop: probes of a backend on a random model).

    Returns (list of B generated id lists, the cache after the last step, seconds of prefill,
    decode steps taken).
    """
    import time

    stop = _newline_ids(tokenizer) if tokenizer is not None else frozenset()
    cache = new_cache(model)
    start = time.perf_counter()
    logits = forward(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    prefill_s = time.perf_counter() - start
    rows = [[] for _ in range(input_ids.shape[0])]
    done = [False] * len(rows)
    steps = 0
    for steps in range(1, max_new_tokens + 1):
        nxt = logits[:, -1].argmax(-1)
        for row, token in enumerate(nxt.tolist()):
            if not done[row]:
                rows[row].append(token)
                # A newline ends a row only after some answer text (lists may start on a new line).
                done[row] = token in stop and bool(tokenizer.decode(rows[row]).strip())
        if all(done) or steps == max_new_tokens:
            break
        logits = forward(input_ids=nxt[:, None], past_key_values=cache, use_cache=True).logits
    return rows, cache, prefill_s, steps


@torch.no_grad()
def teacher_forced_nll(forward, model, input_ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Negative log-likelihood [B, L - prefix] of tokens ``prefix..L-1``, fed one token per step.

    The first ``prefix`` tokens are prefilled at once; every later token goes through the cache as a
    decode step, so a quantized or compressed cache (and its decode-time updates) is what's scored.
    Computed in float64 from the step's logits.
    """
    cache = new_cache(model)
    logits = forward(input_ids=input_ids[:, :prefix], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    nll = []
    for pos in range(prefix, input_ids.shape[1]):
        logp = torch.log_softmax(logits[:, -1].double(), dim=-1)
        target = input_ids[:, pos]
        nll.append(-logp.gather(1, target[:, None])[:, 0])
        if pos + 1 < input_ids.shape[1]:
            logits = forward(input_ids=target[:, None], past_key_values=cache, use_cache=True).logits
    return torch.stack(nll, dim=1)


def cache_bytes(cache) -> int:
    """Bytes of storage behind the cache's keys and values, each storage counted once.

    Storage, not ``numel * element_size``: a kvpass packed cache hands the model slots, tensors shaped
    like the full-precision cache with zero strides whose storage is the packed buffer
    (kvpass/variants/packed.py), so only the storage says what is held.
    """
    total, seen = 0, set()
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total
