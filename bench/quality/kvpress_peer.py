"""The kvpress peer (NVIDIA kvpress 0.5.5), run inside its own pinned environment.

kvpress needs transformers < 5.3, so this file runs under the venv that ``bench/quality/setup_kvpress_env.sh``
builds, as ``VENV/bin/python -m bench.quality.kvpress_peer IN.json OUT.json`` from the repository
root; it imports nothing of kvpass and, of this package, only ``decode`` (torch only). IN.json is
written by the main runner: the converted model folder, the prompts as token ids (the same ids the
main environment feeds), the press configurations and the perplexity texts. OUT.json holds the
generated ids per (configuration, prompt) and the perplexity sums; the main runner scores and merges.

Two protocols (``configs.py`` names them), on one prefill of the whole prompt:
- "prompt" (the main rows, like kvpass's policies): each layer's cache of the whole prompt, question
  included, is compressed by the press; the first answer token comes from that prefill's logits
  (kvpress compresses after a layer's attention, so the prefill itself attends over every token),
  the rest is decoded through the compressed cache at the original positions.
- "context" (kvpress's own pipeline, ``KVPressTextGenerationPipeline``): only the context is
  compressed, then the question is read uncompressed at its original positions and the answer
  decoded. Prompts of one batch share one split, the context being the first ``L - q_max`` tokens
  (``q_max``: the batch's longest question); tasks.py keeps needles out of the last 10% of the
  haystack so that tail never holds one. The model is causal, so the context's keys, values and
  hidden states are the first ``split`` positions of the whole prompt's: the press is handed
  those slices (and the matching rotary tables), which is its pipeline's context-only prefill
  without a second prefill (equal up to float32 GEMM blocking; ``check_fan_out`` measures it).

One prefill serves every press, budget and protocol: kvpress's hook rewrites a layer's cache only
after that layer's attention ran on the full keys, so the hidden states of a prefill do not depend on
the press. Here one hook per layer hands the layer's keys and values to each press's own ``compress``
(the method kvpress's hook calls) and keeps each result in that configuration's cache. Presses that
leave bitwise identical caches (PyramidKV falls back to SnapKV when its smallest layer budget,
budget / beta = budget / 20, is under the window, i.e. below 160 tokens with a window of 8) are
decoded once and reported as such.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time

import torch

from bench.quality.decode import _newline_ids, cache_bytes

log = logging.getLogger("kvpress_peer")

PRESS_CLASSES = {
    "snapkv": "SnapKVPress",
    "streaming_llm": "StreamingLLMPress",
    "expected_attention": "ExpectedAttentionPress",
    "pyramidkv": "PyramidKVPress",
}


def make_presses(configs: list[dict]) -> dict:
    """{config name: (protocol, press)} for every configuration with a press."""
    import kvpress

    return {
        c["name"]: (
            c["protocol"],
            getattr(kvpress, PRESS_CLASSES[c["press"]])(compression_ratio=1.0 - c["budget"],
                                                        **(c["press_kwargs"] or {})),
        )
        for c in configs
        if c["press"] is not None
    }


@contextlib.contextmanager
def fan_out(model, presses: dict, split: int | None):
    """During one prefill of the whole prompt, fill ``caches[name]`` with what each press leaves:
    compressed whole-prompt caches ("prompt") and compressed first-``split``-token caches ("context")."""
    from kvpress.utils import extract_keys_and_values
    from transformers import DynamicCache

    caches = {name: DynamicCache() for name in presses}

    def hook(module, args, kwargs, output):
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
        hidden = kwargs["hidden_states"]
        for name, (protocol, press) in presses.items():
            if protocol == "prompt":
                k, v = press.compress(module, hidden, keys, values, output[1], kwargs)
            else:
                cos, sin = kwargs["position_embeddings"]  # [B, L, D]: only SnapKV-style presses read them
                sliced = {**kwargs, "hidden_states": hidden[:, :split],
                          "position_embeddings": (cos[:, :split], sin[:, :split])}
                attn = None if output[1] is None else output[1][..., :split, :split]
                k, v = press.compress(module, hidden[:, :split], keys[:, :, :split], values[:, :, :split], attn, sliced)
            caches[name].update(k, v, module.layer_idx)
        return output

    for _, press in presses.values():
        press.post_init_from_model(model)
    handles = []
    try:
        for layer in model.model.layers:
            layer.self_attn.rotary_emb = model.model.rotary_emb  # as kvpress's own context manager does
            handles.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        yield caches
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def decode(model, tokenizer, cache, logits: torch.Tensor, next_pos: int, max_new_tokens: int):
    """Greedy answer from ``logits`` [B, V] (the step before the answer), the next token at ``next_pos``.

    Positions continue the uncompressed prompt, as kvpress's pipeline does (``generate_answer``).
    """
    stop = _newline_ids(tokenizer)
    batch = logits.shape[0]
    rows, done = [[] for _ in range(batch)], [False] * batch
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)
        for row, token in enumerate(nxt.tolist()):
            if not done[row]:
                rows[row].append(token)
                done[row] = token in stop and bool(tokenizer.decode(rows[row]).strip())
        if all(done) or step + 1 == max_new_tokens:
            break
        pos = torch.full((batch, 1), next_pos + step)
        logits = model(input_ids=nxt[:, None], past_key_values=cache, position_ids=pos).logits[:, -1]
    return rows


@torch.no_grad()
def feed(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Logits [B, T, V] of ``ids`` [B, T] appended to ``cache`` at positions ``start...``.

    One chunk when every layer holds as many tokens; token by token when layers differ (PyramidKV's
    budgets per layer): transformers builds one attention mask from layer 0's length for all layers,
    which a multi-token chunk then applies to layers of other lengths (a shape error; kvpress's own
    pipeline hits it too), while a single token needs no mask.
    """
    batch, steps = ids.shape
    if len({layer.keys.shape[-2] for layer in cache.layers}) == 1:
        pos = torch.arange(start, start + steps)[None].expand(batch, -1)
        return model(input_ids=ids, past_key_values=cache, position_ids=pos).logits
    out = [
        model(input_ids=ids[:, i : i + 1], past_key_values=cache, position_ids=torch.full((batch, 1), start + i)).logits
        for i in range(steps)
    ]
    return torch.cat(out, dim=1)


def _same_cache(a, b) -> bool:
    return len(a.layers) == len(b.layers) and all(
        x.keys.shape == y.keys.shape and torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
        for x, y in zip(a.layers, b.layers)
    )


@torch.no_grad()
def run_batch(model, tokenizer, configs: list[dict], batch: list[dict]) -> tuple[dict, float, int]:
    """Every configuration on one batch of equal-length prompts: one prefill, one decode per distinct
    cache. Returns ({name: {"rows", "cache", "decode_s", "twin"}}, prefill seconds, context split);
    "twin" names an earlier configuration of the same protocol whose cache was bitwise the same."""
    ids = torch.tensor([[*p["context_ids"], *p["query_ids"]] for p in batch])
    length, split = ids.shape[1], min(len(p["context_ids"]) for p in batch)
    t0 = time.perf_counter()
    full = _new_cache()
    with fan_out(model, make_presses(configs), split) as caches:
        first = model(input_ids=ids, past_key_values=full, logits_to_keep=1).logits[:, -1]
    prefill_s = time.perf_counter() - t0
    cache_of = {c["name"]: full if c["press"] is None else caches[c["name"]] for c in configs}
    protocol = {c["name"]: c["protocol"] for c in configs}
    twin_of: dict[str, str | None] = {}  # found before any decoding, which appends to the caches
    for name, cache in cache_of.items():
        twin_of[name] = next(
            (n for n, t in twin_of.items()
             if t is None and protocol[n] == protocol[name] and _same_cache(cache_of[n], cache)),
            None,
        )
    out: dict[str, dict] = {}
    for name, cache in cache_of.items():
        if twin_of[name] is not None:
            out[name] = {**out[twin_of[name]], "decode_s": 0.0, "twin": twin_of[name]}
            continue
        t0 = time.perf_counter()
        if protocol[name] == "context":  # the question, uncompressed, at its original positions
            logits = feed(model, cache, ids[:, split:], split)[:, -1]
        else:
            logits = first
        rows = decode(model, tokenizer, cache, logits, length, batch[0]["max_new_tokens"])
        out[name] = {"rows": rows, "cache": cache, "decode_s": time.perf_counter() - t0, "twin": None}
    return out, prefill_s, split


@torch.no_grad()
def run_prompts(model, tokenizer, configs, prompts, batch_size) -> tuple[list[dict], dict]:
    """Outputs of every configuration on every prompt, and {name: twin} for configurations whose
    cache equalled another's on every batch (decoded once)."""
    results, twins_seen = [], {c["name"]: set() for c in configs}
    groups: dict[tuple, list] = {}
    for p in prompts:
        groups.setdefault((p["task"], p["length"]), []).append(p)
    for (task, length), group in groups.items():
        # Sorted by question length so a batch's shared split cuts as little context as possible.
        group = sorted(group, key=lambda p: len(p["query_ids"]))
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            out, prefill_s, split = run_batch(model, tokenizer, configs, batch)
            for c in configs:
                o = out[c["name"]]
                twins_seen[c["name"]].add(o["twin"])
                per_prompt_bytes = cache_bytes(o["cache"]) / len(batch)
                for p, row in zip(batch, o["rows"]):
                    results.append(
                        {
                            "config": c["name"],
                            "prompt": p["id"],
                            "output_ids": row,
                            "cache_bytes": per_prompt_bytes,
                            "context_tokens": split if c["protocol"] == "context" else length,
                            "prefill_s": prefill_s / len(batch),
                            "decode_s": o["decode_s"] / len(batch),
                        }
                    )
            log.info("kvpress %s L=%d: %d/%d prompts", task, length, start + len(batch), len(group))
    twins = {name: next(iter(seen)) for name, seen in twins_seen.items() if len(seen) == 1 and None not in seen}
    return results, twins


@torch.no_grad()
def run_perplexity(model, configs, texts, prefix):
    """NLL of each text's tokens after ``prefix``, the prefix compressed by each press.

    The continuation goes in as one chunk (``feed``): kvpress compresses at prefill only, so a chunk
    through the compressed cache computes what token-by-token decoding would (up to float32 rounding). The
    texts have no question, so the two protocols coincide: only "prompt" configurations are scored.
    """
    configs = [c for c in configs if c["protocol"] == "prompt"]
    ids = torch.tensor(texts)
    full = _new_cache()
    with fan_out(model, make_presses(configs), None) as caches:
        first = model(input_ids=ids[:, :prefix], past_key_values=full, logits_to_keep=1).logits[:, -1]
    caches["kvpress/none"] = full
    out = []
    for c in configs:
        logits = feed(model, caches[c["name"]], ids[:, prefix:-1], prefix)
        logits = torch.cat([first[:, None], logits], dim=1).double()
        nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, prefix:, None])[..., 0]
        out.append({"config": c["name"], "nll_sum": nll.sum().item(), "tokens": nll.numel()})
    return out


@torch.no_grad()
def check_fan_out(model_path: str, length: int = 200, split: int = 170) -> dict:
    """Largest difference, per protocol, between the fan-out's caches and each press run through its
    own context manager (kvpress's public path) on a random prompt ("prompt") or on its first
    ``split`` tokens alone ("context", kvpress's pipeline prefill); inf on a shape mismatch."""
    from transformers import AutoModelForCausalLM

    from bench.quality.configs import kvpress_configs

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    configs = [c.to_json() for c in kvpress_configs()]
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    with fan_out(model, make_presses(configs), split) as caches:
        model.model(input_ids=ids, past_key_values=_new_cache())
    worst = {"prompt": 0.0, "context": 0.0}
    for name, (protocol, press) in make_presses(configs).items():
        own = _new_cache()
        with press(model):
            model.model(input_ids=ids if protocol == "prompt" else ids[:, :split], past_key_values=own)
        for ours, theirs in zip(caches[name].layers, own.layers):
            if ours.keys.shape != theirs.keys.shape:
                worst[protocol] = float("inf")
                continue
            diff = max((ours.keys - theirs.keys).abs().max().item(), (ours.values - theirs.values).abs().max().item())
            worst[protocol] = max(worst[protocol], diff)
    return worst


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    src, dst = argv
    spec = json.loads(open(src).read())
    from importlib.metadata import version

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    configs = spec["configs"]
    t0 = time.perf_counter()
    results, twins = run_prompts(model, tokenizer, configs, spec["prompts"], spec["batch_size"])
    t1 = time.perf_counter()
    ppl = run_perplexity(model, configs, spec["ppl_texts"], spec["ppl_prefix"]) if spec.get("ppl_texts") else []
    out = {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "kvpress": version("kvpress"),
        },
        "wall_s": time.perf_counter() - t0,
        "prompts_wall_s": t1 - t0,
        "results": results,
        "same_cache_as": twins,
        "perplexity": ppl,
    }
    with open(dst, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if sys.argv[1] == "--check-fan-out":
        print(json.dumps(check_fan_out(sys.argv[2])))
    else:
        main(sys.argv[1:])
