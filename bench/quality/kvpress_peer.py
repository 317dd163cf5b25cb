"""The kvpress peer (NVIDIA kvpress 0.5.5), run inside its own pinned environment.

kvpress needs transformers < 5.3, so this file runs under the venv that ``bench/setup_kvpress_env.sh``
builds, as ``VENV/bin/python -m bench.quality.kvpress_peer IN.json OUT.json`` from the repository
root; it imports nothing of kvpass and, of this package, only ``decode`` (torch only). IN.json is
written by the main runner: the converted model folder, the prompts as token ids (the same ids the
main environment feeds), the press configurations and the perplexity texts. OUT.json holds the
generated ids per (configuration, prompt) and the perplexity sums; the main runner scores and merges.

Protocol, kvpress's own (its pipeline): the context is prefilled under the press, which compresses
each layer's cache after that layer's attention, and the question and the answer are then decoded
through the compressed cache at their original positions. Prompts of one batch share one split:
the context is the first ``L - q_max`` tokens (``q_max``: the batch's longest question); tasks.py
keeps needles out of the last 10% of the haystack so that tail never holds one.

One prefill serves every press and budget. kvpress's hook only rewrites the cache after a layer's
attention has run on the full keys, so the hidden states of a prefill do not depend on the press;
here one hook per layer hands the layer's full keys and values to each press's own ``compress``
(the method kvpress's hook calls) and keeps each result in that configuration's cache. The results
equal separate runs of each press, at 1/13 of the prefill cost.
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
    import kvpress

    return {
        c["name"]: getattr(kvpress, PRESS_CLASSES[c["press"]])(compression_ratio=1.0 - c["budget"])
        for c in configs
        if c["press"] is not None
    }


@contextlib.contextmanager
def fan_out(model, presses: dict):
    """During one prefill, fill ``caches[name]`` with what each press would leave in the cache."""
    from kvpress.utils import extract_keys_and_values
    from transformers import DynamicCache

    caches = {name: DynamicCache() for name in presses}

    def hook(module, args, kwargs, output):
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
        for name, press in presses.items():
            k, v = press.compress(module, kwargs["hidden_states"], keys, values, output[1], kwargs)
            caches[name].update(k, v, module.layer_idx)
        return output

    for press in presses.values():
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
def answer(model, tokenizer, cache, query: torch.Tensor, context_len: int, max_new_tokens: int):
    """Greedy answer after the question, at positions continuing the uncompressed context (as kvpress)."""
    stop = _newline_ids(tokenizer)
    batch, q = query.shape
    pos = torch.arange(context_len, context_len + q)[None].expand(batch, -1)
    logits = model(input_ids=query, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits
    rows, done = [[] for _ in range(batch)], [False] * batch
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        for row, token in enumerate(nxt.tolist()):
            if not done[row]:
                rows[row].append(token)
                done[row] = token in stop and bool(tokenizer.decode(rows[row]).strip())
        if all(done) or step + 1 == max_new_tokens:
            break
        step_pos = torch.full((batch, 1), context_len + q + step)
        logits = model(input_ids=nxt[:, None], past_key_values=cache, position_ids=step_pos).logits
    return rows


@torch.no_grad()
def run_prompts(model, tokenizer, configs, prompts, batch_size):
    results = []
    groups: dict[tuple, list] = {}
    for p in prompts:
        groups.setdefault((p["task"], p["length"]), []).append(p)
    for (task, length), group in groups.items():
        group = sorted(group, key=lambda p: len(p["query_ids"]))
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            ids = torch.tensor([[*p["context_ids"], *p["query_ids"]] for p in batch])
            split = min(len(p["context_ids"]) for p in batch)
            presses = make_presses(configs)
            t0 = time.perf_counter()
            full = _new_cache()
            with fan_out(model, presses) as caches:
                model.model(input_ids=ids[:, :split], past_key_values=full)
            prefill_s = time.perf_counter() - t0
            caches = {"kvpress/none": full, **caches}
            for c in configs:
                cache = caches[c["name"]]
                t0 = time.perf_counter()
                rows = answer(model, tokenizer, cache, ids[:, split:], split, batch[0]["max_new_tokens"])
                per_prompt_bytes = cache_bytes(cache) / len(batch)
                for p, row in zip(batch, rows):
                    results.append(
                        {
                            "config": c["name"],
                            "prompt": p["id"],
                            "output_ids": row,
                            "cache_bytes": per_prompt_bytes,
                            "context_tokens": split,
                            "prefill_s": prefill_s / len(batch),
                            "decode_s": (time.perf_counter() - t0) / len(batch),
                        }
                    )
            log.info("kvpress %s L=%d: %d/%d prompts", task, length, start + len(batch), len(group))
    return results


@torch.no_grad()
def run_perplexity(model, configs, texts, prefix):
    """NLL of each text's tokens after ``prefix``, the prefix compressed by each press.

    The continuation goes in as one chunk: kvpress compresses at prefill only, so a chunk through
    the compressed cache computes exactly what token-by-token decoding would.
    """
    ids = torch.tensor(texts)
    presses = make_presses(configs)
    full = _new_cache()
    with fan_out(model, presses) as caches:
        first = model(input_ids=ids[:, :prefix], past_key_values=full, logits_to_keep=1).logits[:, -1]
    caches = {"kvpress/none": full, **caches}
    out = []
    for c in configs:
        pos = torch.arange(prefix, ids.shape[1] - 1)[None].expand(ids.shape[0], -1)
        logits = model(input_ids=ids[:, prefix:-1], past_key_values=caches[c["name"]], position_ids=pos).logits
        logits = torch.cat([first[:, None], logits], dim=1).double()
        nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, prefix:, None])[..., 0]
        out.append({"config": c["name"], "nll_sum": nll.sum().item(), "tokens": nll.numel()})
    return out


@torch.no_grad()
def check_fan_out(model_path: str, length: int = 200) -> float:
    """Largest difference between the fan-out's caches and each press run through its own context
    manager (kvpress's public path) on one random prompt; 0.0 when they agree bitwise."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    from bench.quality.configs import kvpress_configs

    configs = [c.to_json() for c in kvpress_configs()]
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    with fan_out(model, make_presses(configs)) as caches:
        model.model(input_ids=ids, past_key_values=_new_cache())
    worst = 0.0
    for name, press in make_presses(configs).items():
        own = _new_cache()
        with press(model):
            model.model(input_ids=ids, past_key_values=own)
        for ours, theirs in zip(caches[name].layers, own.layers):
            if ours.keys.shape != theirs.keys.shape:
                return float("inf")
            worst = max(worst, (ours.keys - theirs.keys).abs().max().item(), (ours.values - theirs.values).abs().max().item())
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
    results = run_prompts(model, tokenizer, configs, spec["prompts"], spec["batch_size"])
    ppl = run_perplexity(model, configs, spec["ppl_texts"], spec["ppl_prefix"]) if spec.get("ppl_texts") else []
    out = {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "kvpress": version("kvpress"),
        },
        "wall_s": time.perf_counter() - t0,
        "results": results,
        "perplexity": ppl,
    }
    with open(dst, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if sys.argv[1] == "--check-fan-out":
        print(check_fan_out(sys.argv[2]))
    else:
        main(sys.argv[1:])
