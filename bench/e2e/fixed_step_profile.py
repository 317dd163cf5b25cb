"""One layer's decode step on a fixed-capacity packed cache, kernel by kernel (GPU).

    python bench/e2e/fixed_step_profile.py --out fixed_step.json             # 8B layer shape, B=1, 4k of 4k
    python bench/e2e/fixed_step_profile.py --device cpu --capacity 256        # CPU: checks the script runs

For each ``kv_bits``: a layer buffer (``lowering/formats/fixed_capacity.py``) of ``--capacity`` tokens filled
to ``--length``, then the decode step the rewritten graph runs per layer: ``fixed_cache_write`` of one token
and ``fixed_cache_attention`` of one query token under a positional mask. Reported per scheme: the step's time
replayed from a CUDA graph (``graph_us``: what the step costs inside ``mode="reduce-overhead"``), the same
step's write alone and attention alone in graphs, and torch.profiler's kernels of one eager step (name, time,
count), so the time a step spends outside the attention kernel shows. ``sdpa`` is torch SDPA over a bf16
cache of ``--length`` tokens (``enable_gqa``), the exact path's attention.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import environment, format_table  # noqa: E402
from lowering import ops  # noqa: E402,F401  (registers torch.ops.kvpass)
from lowering.formats import fixed_capacity as fc  # noqa: E402


def graph_time_us(fn, device: str, reps: int = 200) -> float | None:
    """Microseconds per call of ``fn`` replayed from a CUDA graph (None off CUDA)."""
    if device != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def kernels(fn, device: str, steps: int = 5) -> list[dict]:
    """torch.profiler's device kernels of ``steps`` eager calls: name, microseconds per call, launches per call."""
    activity = torch.profiler.ProfilerActivity.CUDA if device == "cuda" else torch.profiler.ProfilerActivity.CPU
    fn()
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(steps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = e.device_time_total if device == "cuda" else e.self_cpu_time_total
        if t <= 0 or (device == "cuda" and e.device_type != torch.autograd.DeviceType.CUDA and not e.device_time_total):
            continue
        rows.append({"kernel": e.key[:90], "us": round(t / steps, 2), "count": round(e.count / steps, 2)})
    return sorted(rows, key=lambda r: -r["us"])[:25]


def scheme_step(kv_bits, args, device: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    spec = fc.FixedCacheSpec(kv_bits=kv_bits, batch=args.batch, kv_heads=args.kv_heads, capacity=args.capacity,
                             k_dim=args.head_dim, v_dim=args.head_dim, dtype=str(dtype))
    js = spec.to_json()
    buffer = fc.allocate(spec, device)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.kv_heads, args.length - 1, args.head_dim)
    k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(2))
    for start in range(0, args.length - 1, 4096):  # prefill in chunks, as generate does
        n = min(4096, args.length - 1 - start)
        torch.ops.kvpass.fixed_cache_write(buffer, torch.arange(start, start + n, device=device),
                                           k[:, :, start:start + n], v[:, :, start:start + n], js)
    del k, v
    q = torch.randn(args.batch, args.q_heads, 1, args.head_dim, generator=g, device=device, dtype=dtype)
    new_k, new_v = (torch.randn(args.batch, args.kv_heads, 1, args.head_dim, generator=g, device=device, dtype=dtype)
                    for _ in range(2))
    positions = torch.full((1,), args.length - 1, device=device, dtype=torch.int64)
    mask = fc.positional_mask(q, positions, spec.capacity)

    def write():  # the same position every call: the buffer's state stays that of a cache of --length tokens
        torch.ops.kvpass.fixed_cache_write(buffer, positions, new_k, new_v, js)

    def attend():
        return torch.ops.kvpass.fixed_cache_attention(q, buffer, positions, new_k, new_v, mask, False, None, js)

    def step():
        write()
        return attend()

    return {"kv_bits": str(kv_bits), "graph_us": graph_time_us(step, device), "write_us": graph_time_us(write, device),
            "attention_us": graph_time_us(attend, device), "kv_bytes": spec.nbytes, "kernels": kernels(step, device)}


def sdpa_step(args, device: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(args.batch, args.q_heads, 1, args.head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(args.batch, args.kv_heads, args.length, args.head_dim, device=device, dtype=dtype)
            for _ in range(2))

    def attend():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return {"kv_bits": "sdpa", "graph_us": graph_time_us(attend, device), "attention_us": graph_time_us(attend, device),
            "kv_bytes": 2 * k.numel() * k.element_size(), "kernels": kernels(attend, device)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--schemes", default="16,8,fp8,4")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--length", type=int, default=None,
                        help="tokens written (default: capacity - 100: the step writes at a position that completes "
                             "no int4 key group, as 31 of 32 steps do; a multiple of 32 measures the other one)")
    args = parser.parse_args(argv)
    args.length = args.length or args.capacity - 100
    rows = [sdpa_step(args, args.device)]
    for bits in args.schemes.split(","):
        try:
            rows.append(scheme_step(int(bits) if bits.isdigit() else bits, args, args.device))
        except Exception as e:  # noqa: BLE001  (one scheme's failure must not stop the others)
            rows.append({"kv_bits": bits, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    print(format_table([{k: v for k, v in r.items() if k != "kernels"} for r in rows],
                       ["kv_bits", "graph_us", "write_us", "attention_us", "kv_bytes", "error"]))
    for r in rows:
        print(f"\n{r['kv_bits']}: kernels of one eager step")
        print(format_table(r.get("kernels", []), ["kernel", "us", "count"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": environment(), "args": vars(args), "rows": rows},
                                             indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
