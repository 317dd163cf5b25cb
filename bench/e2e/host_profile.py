"""Where the host's time goes in a decode step (cProfile of the Python side), per method.

    python bench/e2e/host_profile.py --methods kvpass-exact,kvpass-int8,kvpass-int4   # GPU, 1B shape, B=1, 4k
    python bench/e2e/host_profile.py --smoke                                          # CPU, tiny model

At batch 1 the packed variants are bound by host time (bench/RESULTS.md, end-to-end): the GPU idles
while Python prepares each layer's op. torch.profiler (bench/e2e/profile_decode.py) says how long the GPU
waits; this says which Python functions it waits on. For each method: a prefill of ``--context``
tokens, warm-up steps, then ``--steps`` decode steps under cProfile; prints ms per step (wall, with
and without the profiler) and the top functions by own time and by cumulative time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.e2e.e2e_decode import build_model, compiled_forward, loop_mask, make_cache, sync  # noqa: E402


def profile_method(model, name: str, batch: int, context: int, steps: int, device: str, top: int) -> str:
    import kvpass

    torch._dynamo.reset()
    kvpass.reset()
    forward = compiled_forward(model, name)
    vocab = model.config.vocab_size
    ids = torch.randint(2, vocab, (batch, context), device=device)
    state = {"cache": make_cache(model, name, batch, context + steps + 16), "pos": context}

    def step(inp):  # state["pos"]: tokens cached once ``inp`` is in
        out = forward(input_ids=inp, past_key_values=state["cache"], use_cache=True,
                      cache_position=torch.arange(state["pos"] - inp.shape[1], state["pos"], device=device),
                      **loop_mask(batch, state["pos"], device))
        state["cache"] = out.past_key_values
        return out.logits[:, -1:].argmax(-1)

    with torch.no_grad():
        tok = step(ids)
        for _ in range(4):  # warm-up: the decode graphs compile (static, then dynamic length)
            state["pos"] += 1
            tok = step(tok)
        sync(device)

        def run(n):
            nonlocal tok
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                state["pos"] += 1
                tok = step(tok)
            sync(device)
            return (time.perf_counter() - t0) / n * 1e3

        run(steps)  # Triton compiles a kernel variant as the length crosses a multiple of 16: warm those too
        plain = run(steps)
        prof = cProfile.Profile()
        prof.enable()
        profiled = run(steps)
        prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    head = (f"== {name}: B={batch}, context {context}: {plain:.2f} ms/step ({profiled:.2f} under cProfile), "
            f"{steps} steps")
    return head + "\n" + text.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script)")
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--methods", default="kvpass-exact,kvpass-int8,kvpass-int4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--layers", type=int, default=4,
                    help="decoder layers (host time per layer does not depend on depth; fewer compile faster)")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    shape, context = ("smoke", min(args.context, 64)) if args.smoke else (args.shape, args.context)
    steps = min(args.steps, 3) if args.smoke else args.steps
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch._dynamo.config.cache_size_limit = 64
    model = build_model(shape, device, dtype, layers=args.layers)
    for name in args.methods.split(","):
        print(profile_method(model, name, args.batch, context, steps, device, args.top), flush=True)


if __name__ == "__main__":
    main()
