"""Cache size over decoding steps and release / rebuild events, per compressed-cache policy.

    python bench/analysis/policy_stats.py                                   # tiny random Llama, CPU, seconds
    python bench/analysis/policy_stats.py --model smollm2 --prompt 2048 --budget 256 --steps 128   # GPU or CPU

For the full cache and each policy (``--policies``), in one run: compile the model's forward with the
kvpass backend, prefill a prompt (random token ids; ``--batch`` > 1 adds left padding), then decode
greedily step by step. After each step it reads ``kvpass.stats()`` (per site: kept, evicted, released,
rebuilt, cold-store bytes, bytes held) and measures the bytes the model's cache tensors really hold
(``untyped_storage().nbytes()`` of every layer's keys and values). Prints a table (final cache size
against the full cache, event totals), writes ``policy_stats.json`` and ``policy_stats.png`` (cache
bytes over steps; rebuild events per step) to ``$OUT`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import kvpass  # noqa: E402
from bench.common import environment, format_table, write_json  # noqa: E402
from lowering.core import stats as site_stats  # noqa: E402

EVENTS = ("evicted", "released", "rebuilt")


def load(name: str, device: str, dtype: torch.dtype):
    from kvpass.models import load_model, save_tiny_llama

    if name == "tiny":
        name = str(save_tiny_llama(os.path.join(tempfile.mkdtemp(), "tiny"), num_hidden_layers=4))
    model, _ = load_model(name, dtype=dtype)
    return model.to(device).eval()


def cache_bytes(cache) -> int:
    """Bytes the model's cache tensors hold (a kvpass slot's storage is its packed buffer)."""
    seen, total = set(), 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def site_totals() -> dict:
    snap = kvpass.stats()["sites"]
    return {name: sum(s.get(name, 0) for s in snap.values()) for name in (*EVENTS, "cold_bytes", "kept")}


def run_policy(model, ids, mask, policy: str, budget: int | None, steps: int, compiler: str) -> dict:
    from transformers import DynamicCache

    torch._dynamo.reset()
    kvpass.reset()
    site_stats.clear()
    options = {"compiler": compiler} if policy == "full" else {"policy": policy, "budget": budget,
                                                                "compiler": compiler}
    forward = torch.compile(model.forward, backend="kvpass", options=options)
    trace = {"bytes": [], **{e: [] for e in EVENTS}, "cold_bytes": []}
    with torch.no_grad():
        out = forward(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True)
        prev = {e: 0 for e in EVENTS}
        for _ in range(steps + 1):
            totals = site_totals()
            trace["bytes"].append(cache_bytes(out.past_key_values))
            trace["cold_bytes"].append(totals["cold_bytes"])
            for e in EVENTS:
                trace[e].append(totals[e] - prev[e])
                prev[e] = totals[e]
            if len(trace["bytes"]) > steps:
                break
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = forward(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    return trace


def plot(results: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for policy, trace in results.items():
        top.plot([b / 2**20 for b in trace["bytes"]], label=policy)
        if any(trace["rebuilt"]):
            bottom.plot(trace["rebuilt"], marker=".", linestyle="-", label=f"{policy} rebuilt")
            bottom.plot(trace["released"], marker="x", linestyle=":", label=f"{policy} released")
    top.set_ylabel("cache held (MiB)")
    top.set_title("KV cache bytes held after each step (step 0 = prefill)")
    top.legend()
    bottom.set_ylabel("tokens per step (all sites)")
    bottom.set_xlabel("decode step")
    bottom.set_title("ADORE rebuild / release events")
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help='"tiny" (random 4-layer Llama), "smollm2" or a local HF folder')
    parser.add_argument("--policies", default="streaming,h2o,snapkv,asl,adore")
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=96)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--compiler", default="eager", choices=("eager", "inductor"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = load(args.model, args.device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    for b in range(1, args.batch):  # left padding: row b starts 4b tokens late
        mask[b, :4 * b] = 0
    results = {"full": run_policy(model, ids, mask, "full", None, args.steps, args.compiler)}
    for policy in args.policies.split(","):
        results[policy] = run_policy(model, ids, mask, policy, args.budget, args.steps, args.compiler)

    full = results["full"]["bytes"][-1]
    rows = [{"policy": p, "prefill MiB": f"{t['bytes'][0] / 2**20:.3f}", "final MiB": f"{t['bytes'][-1] / 2**20:.3f}",
             "vs full": f"{t['bytes'][-1] / full:.3f}", "cold MiB": f"{t['cold_bytes'][-1] / 2**20:.3f}",
             **{e: sum(t[e]) for e in EVENTS}} for p, t in results.items()]
    os.makedirs(args.out, exist_ok=True)
    figure = plot(results, os.path.join(args.out, "policy_stats.png"))
    payload = {"env": environment(), "args": vars(args), "results": results}
    json_path = write_json("policy_stats.json", payload) if os.environ.get("OUT") else None
    print(f"model {args.model}, prompt {args.prompt}, batch {args.batch}, budget {args.budget} tokens per layer and "
          f"KV head, {args.steps} decode steps, {args.device}; plot: {figure}; json: {json_path}")
    print(format_table(rows, ["policy", "prefill MiB", "final MiB", "vs full", "cold MiB", *EVENTS]))


if __name__ == "__main__":
    main()
