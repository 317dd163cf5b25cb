"""Where a decode step's time goes, per method: attention kernels, other kernels, and host time the GPU
waits on (torch.profiler).

    python bench/e2e/profile_decode.py --methods inductor,kvpass-exact,kvpass-int4 [--shape llama3.2-1b]

For each method: one prefill of ``--context`` tokens, warm-up steps, then ``--steps`` profiled decode
steps. The split: GPU time in attention kernels (names matching ``ATTENTION_KERNELS``), GPU time in
every other kernel, and wall time minus GPU busy time (the GPU idles while the host launches: Python,
dispatch, launch overhead). Prints a table and the top host-side entries of the heaviest method.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import environment, format_table, write_json  # noqa: E402
from bench.e2e.e2e_decode import SHAPES, build_model, compiled_forward, make_cache, method_available  # noqa: E402

ATTENTION_KERNELS = re.compile(r"attn|attention|flash|sdpa|fmha|decode|_split|merge|reduce_states|efficient", re.I)


def profile_steps(step, steps: int) -> tuple[dict, str, str]:
    """Profile ``steps`` calls of ``step`` (one decode step each): ms per step of wall time, GPU time in
    attention kernels, in other kernels, and the rest (the GPU waiting on the host); and the top host
    and GPU entries as tables."""
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    attention = other = 0.0
    for event in prof.key_averages():
        gpu = getattr(event, "self_device_time_total", None)
        if gpu is None:
            gpu = getattr(event, "self_cuda_time_total", 0.0)
        if gpu <= 0 or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if ATTENTION_KERNELS.search(event.key):
            attention += gpu
        else:
            other += gpu
    attention, other = attention / steps / 1e3, other / steps / 1e3  # ms per step
    row = dict(wall_ms=round(wall * 1e3, 3), attention_gpu_ms=round(attention, 3), other_gpu_ms=round(other, 3),
               gpu_idle_ms=round(wall * 1e3 - attention - other, 3))
    top_host = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    top_gpu = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12)
    return row, top_host, top_gpu


def profile_method(model, name, batch, context, steps, device, vocab):
    import kvpass

    torch._dynamo.reset()
    kvpass.reset()
    forward = compiled_forward(model, name)
    ids = torch.randint(2, vocab, (batch, context), device=device)
    cache = make_cache(model, name, batch, context + steps + 8)
    with torch.no_grad():
        out = forward(input_ids=ids, past_key_values=cache, use_cache=True,
                      cache_position=torch.arange(context, device=device), logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        position = context

        def step():
            nonlocal out, tok, position
            out = forward(input_ids=tok, past_key_values=out.past_key_values, use_cache=True,
                          cache_position=torch.tensor([position], device=device))
            tok = out.logits[:, -1:].argmax(-1)
            position += 1

        for _ in range(3):
            step()
        row, top_host, top_gpu = profile_steps(step, steps)
    return dict(method=name, batch=batch, context=context, **row), top_host, top_gpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--methods", default="inductor,kvpass-exact,kvpass-int4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    model = build_model(args.shape, "cuda", torch.bfloat16)
    rows, details = [], {}
    for name in args.methods.split(","):
        why = method_available(name)
        if why:
            rows.append(dict(method=name, error=why))
            continue
        try:
            row, host, gpu = profile_method(model, name, args.batch, args.context, args.steps, "cuda",
                                             SHAPES[args.shape]["vocab_size"])
        except Exception as e:  # keep profiling the others
            rows.append(dict(method=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
            continue
        rows.append(row)
        details[name] = {"host": host, "gpu": gpu}
        print(format_table([row], list(row)), flush=True)
        print(f"--- {name}: top host time\n{host}\n--- {name}: top GPU time\n{gpu}", flush=True)
    columns = ["method", "batch", "context", "wall_ms", "attention_gpu_ms", "other_gpu_ms", "gpu_idle_ms", "error"]
    print(format_table(rows, columns))
    write_json("profile_decode.json", {"environment": environment(), "shape": args.shape, "rows": rows,
                                       "details": details})


if __name__ == "__main__":
    main()
