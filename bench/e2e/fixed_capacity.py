"""Decode speed of PackedCache (fixed-capacity packed caches) under CUDA graphs, next to kvpass exact.

    python bench/e2e/fixed_capacity.py --out fixed.json            # GPU: 1B and 8B shapes, 1 x 4k, 1 x 32k, 8 x 4k
    python bench/e2e/fixed_capacity.py --quick --out fixed.json    # GPU: small sizes, a few minutes
    python bench/e2e/fixed_capacity.py --quick --device cpu        # CPU: checks the script runs (numbers meaningless)

Models: Llama-3.2-1B and Llama-3-8B shapes with random bf16 weights (no download; EOS off). Rows, per shape and
point (batch x context):

- ``exact-static-ro``: HF StaticCache, ``torch.compile(model.forward, backend="kvpass",
  options={"mode": "reduce-overhead"})`` (kvpass exact under CUDA graphs, the README's fast exact path);
- ``inductor-static-ro``: HF StaticCache, ``torch.compile(model.forward, mode="reduce-overhead")`` (Inductor's own
  CUDA-graph path, the strongest baseline without kvpass);
- ``packed-<bits>-ro``: ``PackedCache(kv_bits=<bits>)`` with the same compile (int8, int4, fp8);
- ``packed-<policy><budget>-ro``: ``PackedCache(kv_bits=16, policy=..., budget=...)`` (snapkv, h2o, adore at 2048; 32
  with ``--quick``), its prefill through ``torch.compile(model.forward, backend="kvpass")`` (the kept set needs
  the queries), the decode steps as above;
- ``generate-<bits>``: ``model.generate(past_key_values=PackedCache, compile_config=CompileConfig(backend="kvpass",
  options={"mode": "reduce-overhead"}))``, HF's own compiled decode step: seconds of T + 1 tokens minus 1, over T.

The loop rows prefill through the uncompiled model (in chunks, ``--prefill-chunk``), as generate does, then run
``--warmup`` decode steps (compile, CUDA-graph warm-up and recording) and time ``--steps`` more. During the timed
steps, the first two run under ``torch.cuda.set_sync_debug_mode("error")`` (a host synchronisation raises:
``sync_free``, ``sync_error``; the timing runs without the mode's checks), and the CUDA-graph recordings
(``recordings_timed``, counted on cudagraph trees' manager) and Dynamo compiles
(``compiles_timed``) there must be 0. ``check-<bits>`` rows (a 2-layer 1B-shaped model, batch 3, left padding)
compare the greedy tokens of the compiled RO cache with the eager cache (``tokens_equal``: the fraction of equal
tokens; the kernel and the eager reference round differently, so near ties may part).

``--fit-context L`` (``--fit-batches``, ``--fit-tries``): per loop method, instead of the timed points, the largest
batch at context L whose chunked prefill, warm-up (CUDA-graph recording) and decode steps fit in the GPU's memory,
measured by trying batches (``bench/e2e/e2e_fit.py``'s search from two small ones; rows ``fit_probe``, ``fits``,
``peak_GiB``). A fixed-capacity cache holds its whole capacity from the start, so the prefill's chunk, not the
context, sets the transient memory on top of it.

Each row is run in its own try/except: a failure is recorded in its ``error`` and the next row runs. One JSON
(environment, rows) goes to ``--out``; a table is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import kvpass
from bench.common import MODEL_SHAPES, environment, format_table
from bench.e2e.e2e_fit import largest_fit
from kvpass.packed_cache import PackedCache

SHAPES = {name: MODEL_SHAPES[name] for name in ("llama3.2-1b", "llama3-8b")}
RO = {"mode": "reduce-overhead"}


@dataclass(frozen=True)
class Method:
    name: str
    kv_bits: int | str | None  # None: HF StaticCache (kvpass exact)
    via: str = "loop"  # "loop": a plain decode loop; "generate": HF generate with CompileConfig
    policy: str = "full"  # a budgeted policy: the prefill runs through kvpass too (default mode, no CUDA graphs)
    budget: int | None = None  # tokens per layer and KV head (--quick: at most QUICK_BUDGET)
    backend: str = "kvpass"  # "inductor": torch.compile's own backend (StaticCache only)

    def compile(self, forward):
        """``forward`` compiled under reduce-overhead by this method's backend."""
        if self.backend == "inductor":
            return torch.compile(forward, mode="reduce-overhead")
        return torch.compile(forward, backend="kvpass", options=dict(RO))


METHODS = [Method("exact-static-ro", None), Method("inductor-static-ro", None, backend="inductor"),
           Method("packed-8-ro", 8), Method("packed-4-ro", 4),
           Method("packed-fp8-ro", "fp8"), Method("generate-8", 8, "generate"), Method("generate-4", 4, "generate"),
           Method("generate-fp8", "fp8", "generate"),
           Method("packed-snapkv2048-ro", 16, policy="snapkv", budget=2048),
           Method("packed-h2o2048-ro", 16, policy="h2o", budget=2048),
           Method("packed-adore2048-ro", 16, policy="adore", budget=2048)]
QUICK_BUDGET = 32
POINTS = [(1, 4096), (1, 32768), (8, 4096)]
QUICK_POINTS = [(1, 1024), (4, 1024)]


def build_model(shape: str, device: str, layers: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(SHAPES[shape], **({} if layers is None else {"num_hidden_layers": layers}))
    config = LlamaConfig(**sizes, max_position_embeddings=131072, rope_theta=500000.0, attn_implementation="sdpa",
                         bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_cache(model, method: Method, batch: int, max_len: int, quick: bool = False):
    if method.kv_bits is None:
        from transformers import StaticCache

        return StaticCache(config=model.config, max_cache_len=max_len)
    if method.policy == "full":
        return PackedCache(model, batch_size=batch, max_cache_len=max_len, kv_bits=method.kv_bits)
    budget = min(method.budget, QUICK_BUDGET) if quick else method.budget
    return PackedCache(model, batch_size=batch, max_cache_len=max_len, kv_bits=method.kv_bits, policy=method.policy,
                       budget=budget)


def cache_bytes(cache) -> int:
    if isinstance(cache, PackedCache):
        return cache.nbytes
    return sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


class RecordingCounter:
    """CUDA-graph recordings of Inductor's cudagraph trees (``CUDAGraphTreeManager.record_function``, a private
    API: None where this torch has no such method)."""

    def __init__(self):
        self.count = 0
        self.available = False

    @contextlib.contextmanager
    def installed(self):
        try:
            from torch._inductor import cudagraph_trees

            manager = cudagraph_trees.CUDAGraphTreeManager
            original = manager.record_function
        except (ImportError, AttributeError):
            yield self
            return
        self.available = True

        def counted(tree, *args, **kwargs):
            self.count += 1
            return original(tree, *args, **kwargs)

        manager.record_function = counted
        try:
            yield self
        finally:
            manager.record_function = original

    def value(self):
        return self.count if self.available else None


def dynamo_compiles() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def sync_debug(device: str):
    if device != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def prefill(forward, cache, ids, mask, chunk: int):
    """The prompt through ``forward`` (the uncompiled model; kvpass's compiled forward for a budgeted policy, whose
    kept set needs the queries), ``chunk`` tokens at a time; the last logits."""
    out = None
    for start in range(0, ids.shape[1], chunk):
        end = min(ids.shape[1], start + chunk)
        out = forward(input_ids=ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:]


def decode_loop(model, method, batch, context, args, counter) -> dict:
    device, vocab = args.device, model.config.vocab_size
    max_len = context + args.warmup + 2 + args.steps + 1
    cache = make_cache(model, method, batch, max_len, args.quick)
    width = getattr(cache, "max_cache_len", max_len)
    ids = torch.randint(2, vocab, (batch, context), device=device)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)  # generate's static-cache mask: full width
    mask[:, :context] = 1
    # fullgraph off: a graph break in some transformers release costs a graph, not the row (compiles_timed shows it)
    forward = method.compile(model.forward)
    row = {}

    def step(i):
        nonlocal tok
        mask[:, context + i] = 1
        torch.compiler.cudagraph_mark_step_begin()
        out = forward(input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)

    with torch.no_grad():
        # a policy's prefill through kvpass in the default mode: one compiled function for both prefill and
        # decode under reduce-overhead failed in torch 2.11's CUDA graph trees (README, limitations)
        prefill_forward = model if method.policy == "full" else torch.compile(model.forward, backend="kvpass")
        tok = prefill(prefill_forward, cache, ids, mask, args.prefill_chunk).argmax(-1)
        sync(device)
        t0 = time.perf_counter()
        for i in range(args.warmup):  # compile, CUDA-graph warm-up and recording
            step(i)
        sync(device)
        row["warmup_s"] = round(time.perf_counter() - t0, 2)
        recordings, compiles = counter.value(), dynamo_compiles()
        row["sync_free"] = True
        try:
            with sync_debug(device):  # a host synchronisation in a decode step raises
                for i in range(args.warmup, args.warmup + 2):
                    step(i)
        except RuntimeError as e:
            row["sync_free"], row["sync_error"] = False, str(e)[:300]
        sync(device)
        t0 = time.perf_counter()  # timed without the debug mode's checks
        for i in range(args.warmup + 2, args.warmup + 2 + args.steps):
            step(i)
        sync(device)
        row["ms_per_token"] = round((time.perf_counter() - t0) / args.steps * 1e3, 3)
    row["recordings_timed"] = None if recordings is None else counter.value() - recordings
    row["compiles_timed"] = dynamo_compiles() - compiles
    row["kv_bytes"] = cache_bytes(cache)
    return row


def generate_timing(model, method, batch, context, args) -> dict:
    from transformers import CompileConfig

    device, vocab = args.device, model.config.vocab_size
    ids = torch.randint(2, vocab, (batch, context), device=device)
    cache = make_cache(model, method, batch, context + args.steps + 2)
    config = CompileConfig(backend="kvpass", options=dict(RO), mode=None, fullgraph=True)
    config._compile_all_devices = True

    def run(n):
        cache.reset()  # the same buffers every run: CUDA graphs keep their addresses
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, past_key_values=cache, compile_config=config)
        sync(device)
        return time.perf_counter() - t0

    run(args.warmup)  # compiles and records the decode step
    one, many = run(1), run(args.steps + 1)
    return {"ms_per_token": round((many - one) / args.steps * 1e3, 3), "kv_bytes": cache_bytes(cache)}


def token_check(kv_bits, args) -> dict:
    """Greedy tokens of the compiled RO cache against the eager cache (2-layer 1B-shaped model): the fraction
    of equal tokens, the first step where a row's tokens part (``first_divergence``, the minimum over rows;
    ``new`` when none do) and the largest logit difference over the steps before it, relative to the largest
    logit (``logits_rel_err``: both runs saw the same tokens there, so this is the kernels' rounding alone;
    the 16-bit row gives the level of bf16 rounding between kvpass's kernel and eager SDPA)."""
    model = build_model("llama3.2-1b", args.device, layers=2) if args.device == "cuda" else build_small_cpu_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, model.config.vocab_size, (3, 45), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :9] = 0, 0
    new = 40

    def generate(forward):
        cache = PackedCache(model, batch_size=3, max_cache_len=45 + new, kv_bits=kv_bits)
        plain, model.forward = model.forward, forward
        try:
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                     past_key_values=cache, output_logits=True, return_dict_in_generate=True)
            return out.sequences[:, 45:], torch.stack(out.logits, 1).float()  # [B, new], [B, new, V]
        finally:
            model.forward = plain

    eager, eager_logits = generate(model.forward)
    compiled, compiled_logits = generate(torch.compile(model.forward, backend="kvpass", options=dict(RO),
                                                       fullgraph=True))
    sites = kvpass.report().sites
    parted = (eager != compiled).int().cumsum(1) > 0  # [B, new]: at or after the row's first differing token
    first = int((~parted).sum(1).min().item())
    same_inputs = ~torch.cat([torch.zeros_like(parted[:, :1]), parted[:, :-1]], 1)  # steps fed equal tokens
    diff = ((eager_logits - compiled_logits).abs().amax(-1) * same_inputs).amax().item()
    return {"tokens_equal": round((eager == compiled).float().mean().item(), 4), "first_divergence": first,
            "logits_rel_err": round(diff / eager_logits.abs().amax().item(), 5),
            "sites_fixed": sum(s.lowering.startswith("fixed_cache_attention") for s in sites), "sites": len(sites)}


def fit_rows(model, method, shape, args, counter, rows: list) -> None:
    """The largest batch of ``method`` at ``args.fit_context`` that fits (module docstring): appends one row per
    batch tried to ``rows`` as it ends, ``fits`` False with the error where it did not."""
    fit_args = argparse.Namespace(**{**vars(args), "warmup": 2, "steps": 1})

    def attempt(batch: int) -> dict:
        base = {"shape": shape, "layers": model.config.num_hidden_layers, "method": method.name, "batch": batch,
                "context": args.fit_context, "fit_probe": True, "prefill_chunk": args.prefill_chunk}
        row = run_row(lambda: decode_loop(model, method, batch, args.fit_context, fit_args, counter), base)
        row["fits"] = "error" not in row
        row["peak_GiB"] = row.get("peak_gb")
        rows.append(row)
        return row

    largest_fit(attempt, args.fit_batches, torch.cuda.get_device_properties(0).total_memory / 2**30, args.fit_tries)


def run_row(fn, base: dict) -> dict:
    row = dict(base)
    torch._dynamo.reset()
    kvpass.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        row.update(fn())
    except Exception as e:  # noqa: BLE001  (one row's failure must not stop the others)
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        row["traceback"] = traceback.format_exc()[-3000:]
        if "sync" in str(e).lower():
            row["sync_free"] = False
    if torch.cuda.is_available():
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "fixed_capacity.json"))
    parser.add_argument("--quick", action="store_true", help="small sizes (1B shape, 4 layers, 1k contexts)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help="comma-separated, of " + ", ".join(SHAPES))
    parser.add_argument("--methods", default=None, help="comma-separated, of " + ", ".join(m.name for m in METHODS))
    parser.add_argument("--points", default=None, help="BxL,... e.g. 1x4096,8x4096")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--no-check", action="store_true", help="skip the check-<bits> token rows")
    parser.add_argument("--fit-context", type=int, default=0,
                        help="instead of the points: the largest batch at this context, per loop method (GPU)")
    parser.add_argument("--fit-batches", type=lambda s: [int(b) for b in s.split(",")], default=[2, 4],
                        help="the two small batches the search starts from")
    parser.add_argument("--fit-tries", type=int, default=2)
    args = parser.parse_args(argv)
    quick_cpu = args.quick and args.device == "cpu"
    if args.quick:
        args.steps = min(args.steps, 3 if quick_cpu else 16)
        args.warmup = min(args.warmup, 3 if quick_cpu else 4)
    shapes = args.shapes.split(",") if args.shapes else (["llama3.2-1b"] if args.quick else list(SHAPES))
    layers = (2 if quick_cpu else 4) if args.quick else None
    points = ([tuple(int(x) for x in p.split("x")) for p in args.points.split(",")] if args.points
              else [(1, 64), (2, 64)] if quick_cpu else QUICK_POINTS if args.quick else POINTS)
    methods = [m for m in METHODS if not args.methods or m.name in args.methods.split(",")]
    rows = Rows(args, RecordingCounter())
    counter = rows.counter
    with counter.installed():
        if not args.no_check:
            for bits in (16, 8, 4, "fp8"):
                rows.append(run_row(lambda bits=bits: token_check(bits, args), {"method": f"check-{bits}"}))
        for shape in shapes:
            try:
                # on the CPU a small model: it only checks that the script runs
                model = build_small_cpu_model() if quick_cpu else build_model(shape, args.device, layers)
            except Exception as e:  # noqa: BLE001
                rows.append({"shape": shape, "error": f"model: {type(e).__name__}: {e}"})
                continue
            if args.fit_context:
                for method in methods:
                    if method.via == "loop":
                        fit_rows(model, method, shape, args, counter, rows)
            for batch, context in [] if args.fit_context else points:
                for method in methods:
                    base = {"shape": shape, "layers": model.config.num_hidden_layers, "method": method.name,
                            "batch": batch, "context": context}
                    if method.via == "generate":
                        rows.append(run_row(lambda m=method, b=batch, c=context, model=model:
                                            generate_timing(model, m, b, c, args), base))
                    else:
                        rows.append(run_row(lambda m=method, b=batch, c=context, model=model:
                                            decode_loop(model, m, b, c, args, counter), base))
            del model
    rows.write()
    columns = ["shape", "method", "batch", "context", "fits", "ms_per_token", "recordings_timed", "compiles_timed",
               "sync_free", "kv_bytes", "peak_gb", "tokens_equal", "first_divergence", "logits_rel_err", "error"]
    print(format_table([{k: (str(v)[:60] if k == "error" else v) for k, v in r.items()} for r in rows], columns))
    print(f"wrote {args.out}")
    return 0


class Rows(list):
    """The result rows, written to ``args.out`` after each one: a run cut short by its time limit keeps what it
    measured."""

    def __init__(self, args, counter):
        super().__init__()
        self.args, self.counter = args, counter

    def append(self, row: dict) -> None:
        super().append(row)
        self.write()
        print(json.dumps(row, default=str), flush=True)

    def write(self) -> None:
        payload = {"environment": environment(), "args": vars(self.args), "recording_counter": self.counter.available,
                   "rows": list(self)}
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text(json.dumps(payload, indent=1, default=str))


def build_small_cpu_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, attn_implementation="sdpa", bos_token_id=1,
                         eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


if __name__ == "__main__":
    sys.exit(main())
