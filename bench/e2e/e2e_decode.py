"""End-to-end decode speed and memory of a Llama-shaped HF model: eager, Inductor, and kvpass variants.

    python bench/e2e/e2e_decode.py                  # GPU: the table of bench/RESULTS.md ("End-to-end decode")
    python bench/e2e/e2e_decode.py --smoke          # CPU: a tiny model, to check the script runs

Models are built from a config with random bf16 weights (no download): the Llama-3-8B shape (32
layers, Hq=32, Hkv=8, D=128) and the Llama-3.2-1B shape (16 layers, Hq=32, Hkv=8, D=64). Random
weights decode garbage, but the time of a step does not depend on which tokens come out; EOS is
disabled so every run decodes all its tokens.

Per method, one compiled model serves every (batch, context) of a shape, so each method compiles as
a user's server would: a prefill graph and a decode graph that go dynamic on the first new shape.
For each (batch, context): one prefill, ``--warmup-steps`` untimed steps (WARMUP_STEPS), then ``--new-tokens``
timed decode steps (a plain loop over ``model(...)`` with the cache, synchronised at the end); the first run of a method
also records its compile time (wall time of the first prefill and warm-up steps minus that of the
next ones) and the Dynamo compile count. Peak memory is ``torch.cuda.max_memory_allocated`` over the
run, KV bytes are measured from the tensors the cache holds afterwards.

``--generate`` also times ``model.generate`` (greedy, the compiled forward as the model's forward, the
cache HF makes: dynamic, or static for the static methods) at each point: the time of ``T + 1`` new
tokens minus that of 1, over T, so prefill cancels (after a 3-token warm-up generate, which compiles generate's
graphs). ``--fit-context L``: after the timed points, per method, the largest batch at context L whose prefill
and decode steps fit in the GPU's memory (``fit_probe``: two small batches predict it, then it is tried);
``--fit-chunk N`` prefills in chunks of N tokens, as a server does, so that the KV cache and not the prefill's
activations decides.
``--dynamic`` compiles with ``dynamic=True`` (fewer recompiles across points); ``--generate-points``
restricts ``--generate`` to some points.

Methods: eager; ``inductor`` (torch.compile default, HF DynamicCache); ``inductor-static-ro``
(StaticCache + mode="reduce-overhead", HF's documented fast path); ``kvpass-*`` for each variant
whose options validate (exact; int8; int4; a policy at budget 2048; early exit; the best combination).
kvpass's packed variants replace the DynamicCache, whose tensors change shape every step, so CUDA
graphs (reduce-overhead) would re-record every step: they run without them, and the exact variant is
also shown with StaticCache + reduce-overhead.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import MODEL_SHAPES, environment, format_table, write_json  # noqa: E402

SHAPES = {
    **MODEL_SHAPES,
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256),
}

# name -> (compile spec, cache implementation); a spec of None is eager.
METHODS = {
    "eager": (None, None),
    "inductor": ({"backend": "inductor"}, None),
    "inductor-static-ro": ({"backend": "inductor", "mode": "reduce-overhead"}, "static"),
    "kvpass-exact": ({"backend": "kvpass", "options": {}}, None),
    "kvpass-exact-static-ro": ({"backend": "kvpass", "options": {"mode": "reduce-overhead"}}, "static"),
    "kvpass-int8": ({"backend": "kvpass", "options": {"kv_bits": 8}}, None),
    "kvpass-int4": ({"backend": "kvpass", "options": {"kv_bits": 4}}, None),
    "kvpass-fp8": ({"backend": "kvpass", "options": {"kv_bits": "fp8"}}, None),
    "kvpass-snapkv2048": ({"backend": "kvpass", "options": {"policy": "snapkv", "budget": 2048}}, None),
    "kvpass-adore2048": ({"backend": "kvpass", "options": {"policy": "adore", "budget": 2048}}, None),
    "kvpass-exit": ({"backend": "kvpass", "options": {"early_exit": 1e-3}}, None),
    "kvpass-int4-exit": ({"backend": "kvpass", "options": {"kv_bits": 4, "early_exit": 1e-3}}, None),
    "kvpass-snapkv2048-int8": ({"backend": "kvpass", "options": {"policy": "snapkv", "budget": 2048, "kv_bits": 8}},
                               None),
}


def build_model(shape: str, device: str, dtype: torch.dtype, layers: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = SHAPES[shape] if layers is None else {**SHAPES[shape], "num_hidden_layers": layers}
    cfg = LlamaConfig(**sizes, max_position_embeddings=131072, rope_theta=500000.0,
                      attn_implementation="sdpa", bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def method_available(name: str) -> str | None:
    spec, _ = METHODS[name]
    if spec and spec["backend"] == "kvpass":
        import kvpass

        try:
            kvpass.validate_options(spec["options"])
        except (ValueError, NotImplementedError) as e:
            return str(e).split(";")[0]
    return None


# ``--dynamic``: every method compiles with ``dynamic=True``, so its first graphs already take any batch and
# length and later points add no recompile (each cost 30-50 s of device time per method at the 1B shape).
DYNAMIC = None


def compiled_forward(model, name: str):
    spec, _ = METHODS[name]
    if spec is None:
        return model.forward
    spec = dict(spec, dynamic=DYNAMIC)
    backend = spec.pop("backend")
    return torch.compile(model.forward, backend=backend, **spec)


def make_cache(model, name: str, batch: int, max_len: int):
    from transformers import DynamicCache, StaticCache

    if METHODS[name][1] == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache()


def cache_bytes(cache) -> int:
    seen, total = set(), 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is None:
                continue
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# The plain loop passes the 2-D attention mask generate() passes (all ones here). Without one, HF hands
# SDPA no mask, and Inductor's decode attention then took 5.6x longer than with it (1B shape, 1 x 32k,
# H100: 49.8 vs 8.8 ms/token): a loop without it would time a baseline no generate() user sees.
# ``--no-loop-mask`` reproduces the rows measured before (2026-11-23, up to the 8B run).
LOOP_MASK = True


def loop_mask(batch: int, length: int, device, width: int | None = None) -> dict:
    """The 2-D mask of ``length`` filled positions. A StaticCache gets it at the cache's full ``width``, zeros
    past ``length``: a fixed shape, as generate() hands its static-cache forward a fixed-shape mask. A mask that
    grew every step made CUDA graphs re-record each step (reduce-overhead rows before 2026-12-01 22:00Z)."""
    if not LOOP_MASK:
        return {}
    width = width or length
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    mask[:, :length] = 1
    return {"attention_mask": mask}


# ``--eager-prefill``: methods that keep HF's own cache (eager, Inductor, kvpass exact) prefill through the uncompiled
# model and decode through the compiled one. Compiled, HF builds the 4-D causal mask from the 2-D one
# ([B, 1, L, L]: it cannot look at the mask's values to skip it as eager does) and SDPA then runs a masked
# kernel: Inductor's 8B prefill at 8 x 32k ran out of the H200's memory that way (2026-12-01). Eager HF
# sees an all-ones mask, drops it and runs causal flash attention. The cache it leaves is the same
# DynamicCache / StaticCache the compiled decode reads. kvpass's exact variant keeps HF's cache too (it
# rewrites only the attention), so it prefills the same way; the other kvpass methods must prefill compiled
# (the rewritten site writes their packed cache), so they always do.
EAGER_PREFILL = False
# Untimed decode steps per point. Triton specialises integer arguments divisible by 16, so the kernels of
# a step whose length is a multiple of 16 compile on first sight: with 2 warm-up steps that happened
# inside the timed steps (1B shape, H200, 2026-12-01: Inductor 68.9 ms/token at 1 x 16k, 47.3 at 1 x 32k).
# 17 steps see every length residue mod 16 before timing starts.
WARMUP_STEPS = 17


def prefill_forward(model, forward, name: str):
    spec, _ = METHODS[name]
    keeps_hf_cache = spec is None or spec["backend"] != "kvpass" or _kvpass_exact(spec["options"])
    return model.forward if EAGER_PREFILL and keeps_hf_cache else forward


def _kvpass_exact(options: dict) -> bool:
    from kvpass.options import parse_options

    return parse_options(options).is_exact


def decode_run(model, forward, name, batch, context, new_tokens, device, vocab, prefill_chunk=0):
    """Prefill ``context`` tokens (in chunks of ``prefill_chunk`` tokens, 0: at once) then decode; returns
    seconds of (prefill, each warm-up step, the timed steps) and the cache."""
    ids = torch.randint(2, vocab, (batch, context), device=device)
    max_len = context + new_tokens + WARMUP_STEPS + 16  # 16: profiled steps
    cache = make_cache(model, name, batch, max_len)
    width = max_len if METHODS[name][1] == "static" else None
    pos = torch.arange(context, device=device)
    times = {}
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        chunk = prefill_chunk or context
        for start in range(0, context, chunk):
            end = min(context, start + chunk)
            out = prefill_forward(model, forward, name)(input_ids=ids[:, start:end], past_key_values=cache,
                                                         use_cache=True, cache_position=pos[start:end],
                                                         logits_to_keep=1, **loop_mask(batch, end, device, width))
            cache = out.past_key_values
        sync(device)
        times["prefill"] = time.perf_counter() - t0
        tok = out.logits[:, -1:].argmax(-1)
        step_times = []
        for i in range(new_tokens + WARMUP_STEPS):
            p = torch.tensor([context + i], device=device)
            if i == WARMUP_STEPS:
                sync(device)
                t0 = time.perf_counter()
            ts = time.perf_counter()
            out = forward(input_ids=tok, past_key_values=out.past_key_values, use_cache=True, cache_position=p,
                          **loop_mask(batch, context + i + 1, device, width))
            tok = out.logits[:, -1:].argmax(-1)
            if i < WARMUP_STEPS:
                sync(device)
                step_times.append(time.perf_counter() - ts)
        sync(device)
        times["decode"] = (time.perf_counter() - t0) / new_tokens
        times["warmup_steps"] = step_times
    return times, out.past_key_values


def generate_run(model, forward, name, batch, context, new_tokens, device, vocab) -> float:
    """Seconds per token of ``model.generate`` with ``forward`` as the model's forward (prefill cancels)."""
    ids = torch.randint(2, vocab, (batch, context), device=device)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if METHODS[name][1] == "static":
        kwargs["cache_implementation"] = "static"
    plain = model.forward
    model.forward = forward
    try:
        with torch.no_grad():
            def run(n):
                sync(device)
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
                sync(device)
                return time.perf_counter() - t0

            run(3)  # warm-up: generate's own graphs (its inputs differ from the plain loop's) compile here
            return (run(new_tokens + 1) - run(1)) / new_tokens
    finally:
        model.forward = plain


def fit_attempt(model, forward, name, batch, context, device, vocab, shape, chunk) -> dict:
    """One probe point: prefill ``context`` tokens (chunks of ``chunk``) and two decode steps at ``batch``."""
    global WARMUP_STEPS, LOOP_MASK
    row = dict(shape=shape, method=name, batch=batch, context=context, fit_probe=True, prefill_chunk=chunk)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    # Memory, not time, is read here; no 2-D mask: HF then builds the chunks' causal mask as a broadcast view
    # (batch stride 0), where an all-ones 2-D mask makes it materialise [B, 1, chunk, L] bools, transient
    # memory no server pays.
    (warmup, masked), WARMUP_STEPS, LOOP_MASK = (WARMUP_STEPS, LOOP_MASK), 1, False
    try:
        _, cache = decode_run(model, forward, name, batch, context, 1, device, vocab, chunk)
        row["kv_GiB"] = round(cache_bytes(cache) / 2**30, 3)
        row["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["fits"] = True
        del cache
    except torch.OutOfMemoryError:
        row["fits"], row["error"] = False, "out of memory"
    except Exception as e:
        row["fits"], row["error"] = False, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        WARMUP_STEPS, LOOP_MASK = warmup, masked
    print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    return row


def fit_probe(model, forward, name, context, batches, device, vocab, rows, shape, chunk=0, tries=4):
    """The largest batch at ``context`` whose prefill (chunks of ``chunk`` tokens) and decode steps fit
    (the search: ``bench/e2e/e2e_fit.py``)."""
    from bench.e2e.e2e_fit import largest_fit

    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    rows.extend(largest_fit(lambda b: fit_attempt(model, forward, name, b, context, device, vocab, shape, chunk),
                            batches, total, tries))
    gc.collect()
    torch.cuda.empty_cache()


def profile_point(forward, cache, batch, position, steps, width=None):
    """Where a decode step's time goes at this point (bench/e2e/profile_decode.py's split), on the warm cache."""
    from bench.e2e.profile_decode import profile_steps

    state = {"cache": cache, "position": position, "width": width}
    tok = torch.full((batch, 1), 5, device="cuda", dtype=torch.long)

    def step():
        out = forward(input_ids=tok, past_key_values=state["cache"], use_cache=True,
                      cache_position=torch.tensor([state["position"]], device="cuda"),
                      **loop_mask(batch, state["position"] + 1, "cuda", state["width"]))
        state["cache"], state["position"] = out.past_key_values, state["position"] + 1

    with torch.no_grad():
        row, _, _ = profile_steps(step, steps)
    return {f"profile_{k}": v for k, v in row.items()}


def run_method(model, shape, name, points, new_tokens, device, rows, args):
    import kvpass
    from kvpass import _compat

    torch._dynamo.reset()
    kvpass.reset()
    forward = compiled_forward(model, name)
    first = True
    for batch, context in points:
        row = dict(shape=shape, method=name, batch=batch, context=context)
        if prefill_forward(model, forward, name) != forward:
            row["prefill"] = "eager"
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = _compat.dynamo_compile_count()
        try:
            times, cache = decode_run(model, forward, name, batch, context, new_tokens, device,
                                      model.config.vocab_size)
            if first:  # again, warm: the difference is compile time
                warm, cache = decode_run(model, forward, name, batch, context, new_tokens, device,
                                         model.config.vocab_size)
                row["compile_s"] = round(times["prefill"] + sum(times["warmup_steps"]) - warm["prefill"]
                                         - sum(warm["warmup_steps"]), 2)
                times = warm
                first = False
            row["ms_per_token"] = round(times["decode"] * 1e3, 3)
            row["tokens_per_s"] = round(batch / times["decode"], 1)
            row["prefill_s"] = round(times["prefill"], 3)
            row["kv_bytes"] = cache_bytes(cache)
            row["kv_GiB"] = round(row["kv_bytes"] / 2**30, 3)
            if device == "cuda":
                row["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            row["compiles"] = _compat.dynamo_compile_count() - before
            if device == "cuda" and args.profile_steps:
                try:  # a profiler failure must not lose the timing above
                    width = context + new_tokens + WARMUP_STEPS + 16 if METHODS[name][1] == "static" else None
                    row.update(profile_point(forward, cache, batch, context + new_tokens + WARMUP_STEPS,
                                             args.profile_steps, width))
                except Exception as e:
                    row["profile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            if args.generate and (not args.generate_points or f"{batch}x{context}" in args.generate_points.split(",")):
                row["generate_ms_per_token"] = round(
                    generate_run(model, forward, name, batch, context, new_tokens, device,
                                 model.config.vocab_size) * 1e3, 3)
                row["compiles_with_generate"] = _compat.dynamo_compile_count() - before
            stats = kvpass.stats()["attention_calls"]
            if stats:
                row["attention_calls"] = dict(stats)
            del cache
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as e:  # one failing method must not stop the others
            row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"  # an assert has no text
            if args.verbose:
                traceback.print_exc()
        rows.append(row)
        print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    if args.fit_context and device == "cuda" and (not args.fit_methods or name in args.fit_methods.split(",")):
        fit_probe(model, forward, name, args.fit_context, [int(b) for b in args.fit_batches.split(",")], device,
                  model.config.vocab_size, rows, shape, args.fit_chunk, args.fit_tries)


COLUMNS = ["shape", "method", "batch", "context", "prefill", "ms_per_token", "tokens_per_s", "generate_ms_per_token",
           "kv_GiB", "peak_GiB", "fits", "compile_s", "compiles", "prefill_s", "profile_attention_gpu_ms",
           "profile_other_gpu_ms", "profile_gpu_idle_ms", "error"]


def main():
    global LOOP_MASK, EAGER_PREFILL, WARMUP_STEPS, DYNAMIC
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script)")
    ap.add_argument("--shapes", default="llama3.2-1b,llama3-8b")
    ap.add_argument("--points", default="", help="batch x context list, e.g. 1x4096,8x32768 (default per shape)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--profile-steps", type=int, default=4, help="decode steps profiled per point (0: none)")
    ap.add_argument("--generate", action="store_true", help="also time model.generate at each point")
    ap.add_argument("--fit-context", type=int, default=0, help="largest-batch probe at this context (GPU)")
    ap.add_argument("--fit-batches", default="8,16", help="two batches the probe measures to predict the largest")
    ap.add_argument("--no-loop-mask", action="store_true", help="plain loop without an attention mask (old rows)")
    ap.add_argument("--eager-prefill", action="store_true",
                    help="eager, Inductor, kvpass exact prefill uncompiled (EAGER_PREFILL); rows are marked")
    ap.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="untimed decode steps per point")
    ap.add_argument("--generate-points", default="", help="with --generate: only these points (e.g. 8x32768)")
    ap.add_argument("--fit-tries", type=int, default=4, help="probe attempts beyond the predicted batch")
    ap.add_argument("--fit-methods", default="", help="methods the probe runs for (default: all)")
    ap.add_argument("--fit-chunk", type=int, default=0,
                    help="the probe prefills in chunks of this many tokens (0: at once)")
    ap.add_argument("--dynamic", action="store_true", help="compile with dynamic=True (see DYNAMIC)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's; fewer for probes)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    # generate() and the plain loop call forward with different keyword sets, each its own graphs (prefill,
    # decode, dynamic decode, per batch): past Dynamo's default of 8 the function silently runs eagerly,
    # which would time eager under every method's name.
    torch._dynamo.config.recompile_limit = 64
    LOOP_MASK = not args.no_loop_mask
    EAGER_PREFILL = args.eager_prefill
    WARMUP_STEPS = args.warmup_steps
    DYNAMIC = True if args.dynamic else None
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = ["smoke"] if args.smoke else args.shapes.split(",")
    default_points = {"smoke": [(1, 64), (2, 96)], "llama3.2-1b": [(1, 4096), (8, 4096), (1, 32768), (8, 32768)],
                      "llama3-8b": [(8, 32768)]}
    rows = []
    print(" | ".join(COLUMNS), flush=True)
    for shape in shapes:
        points = ([tuple(map(int, p.split("x"))) for p in args.points.split(",")] if args.points
                  else default_points[shape])
        model = build_model(shape, device, dtype, args.layers)
        label = shape if args.layers is None else f"{shape}, {args.layers} layers"
        for name in args.methods.split(","):
            why = method_available(name)
            if why:
                rows.append(dict(shape=label, method=name, error=f"not available: {why}"))
                continue
            run_method(model, label, name, points, args.new_tokens if not args.smoke else 4, device, rows, args)
            write_json("e2e_decode.json", {"environment": environment(), "new_tokens": args.new_tokens, "rows": rows})
        del model
        gc.collect()
    print()
    print(format_table(rows, COLUMNS))
    path = write_json("e2e_decode.json", {"environment": environment(), "new_tokens": args.new_tokens, "rows": rows})
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
