"""ASL's settling test on real prompts: the rank-spread ratio of every layer after ASL's first layer.

    python bench/analysis/asl_rank_spread.py --budget 64 --n 3   # SmolLM2, multikey and passkey prompts, 512 tokens

ASL (lowering/formats/asl.py) selects at the first layer whose rank spread (the variance across the last
SPAN layers of the ranks of the tokens in any of their top budget - window, averaged over those tokens)
falls under SETTLE_RATIO times its value at FIRST_LAYER. This prints that ratio per layer from
FIRST_LAYER + 1 on, one line per prompt, so one can see whether the rule can fire on a model at all.
CPU, about 10 s per prompt.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import lowering.formats.asl as asl  # noqa: E402
from bench.quality import tasks  # noqa: E402
from kvpass.models import load_model  # noqa: E402


def spread_ratios(model, ids: torch.Tensor) -> list[float]:
    """Ratios spread(layer) / spread(FIRST_LAYER) of one prefill, layers FIRST_LAYER + 1 onwards."""
    seen = []
    original = asl.rank_spread

    def recording(ranks, top):
        spread = original(ranks, top)
        seen.append(spread)
        return spread

    asl.rank_spread = recording
    try:  # a new forward starts by itself (its first layer's site was seen before)
        with torch.no_grad():
            model(input_ids=ids, use_cache=True)
    finally:
        asl.rank_spread = original
    return [(s / seen[0]).item() for s in seen[1:]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--n", type=int, default=3, help="prompts per task")
    ap.add_argument("--tasks", nargs="+", default=["multikey", "passkey"], choices=list(tasks.TASKS))
    args = ap.parse_args()
    model, tokenizer = load_model(args.model)
    model.forward = torch.compile(model.forward, backend="kvpass",
                                  options={"policy": "asl", "budget": args.budget, "compiler": "eager"})
    print(f"ratio per layer from {asl.FIRST_LAYER + 1} (ASL selects where it is <= {asl.SETTLE_RATIO})")
    for name in args.tasks:
        for prompt in tasks.make_prompts(name, tokenizer, args.length, args.n):
            ratios = spread_ratios(model, torch.tensor([prompt.input_ids]))
            print(f"{name} {prompt.index}: " + " ".join(f"{r:.2f}" for r in ratios), flush=True)


if __name__ == "__main__":
    main()
