"""One layer's decode step of a budgeted cache: the general step against the in-place slot replacement
(``lowering/slot_replacement.py``), next to the full cache at the same context, through ``kvpass::cache_attention``.

    python bench/e2e/policy_decode_step.py                 # GPU: B=8, Hq=32, Hkv=8, D=128, bf16, 32k, budget 2048
    python bench/e2e/policy_decode_step.py --smoke         # CPU: small shapes (host-side cost only)

Each row: prefill ``--context`` tokens through the op (the policy selects ``--budget``), then ``--steps``
single-token decode steps, each fed the previous step's slots as HF's cache does; the time per step is
wall time over the timed steps after ``--warmup`` untimed ones, synchronised (an eager call of the op, host
time included: what a decode step without CUDA graphs pays per layer). ``full``: the exact cache
(``policy="full"``, kv_bits 16) over the whole context, the same op path. Each in-place row is checked
against the general row just run: the same kept positions (``same_kept``) and the last step's output
(``max_out_diff``; the same rows in another order, so summation order alone).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

if "--smoke" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
from bench.common import environment, format_table, write_json  # noqa: E402
from lowering.core import packed, stats  # noqa: E402
from lowering.formats import FormatSpec, build_format  # noqa: E402

COLUMNS = ["policy", "path", "context", "budget", "ms_per_step", "in_place_steps", "cache_MiB", "same_kept",
           "max_out_diff"]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(spec, q, k, v, context, steps, warmup, device):
    """(seconds per decode step, steps served in place, cache bytes after the run, the last step's output, the
    kept positions at the end, sorted: what the in-place rows are checked against the general step's with)."""
    B, Hkv, _, D = k.shape
    empty = torch.empty(0, device=device)
    with torch.no_grad():  # prefill: 32 query rows (> 16: the prefill path), no mask, the policy selects
        _, kbuf, vbuf = torch.ops.kvpass.cache_attention(q[:, :, :1].expand(-1, -1, 32, -1), empty, empty,
                                                         k[:, :, :context], v[:, :, :context], None, False, None,
                                                         spec, "bench")
        before = stats.calls["policy_replace_in_place"]
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                t0 = time.perf_counter()
            t = context + i
            past = packed.slot_view(kbuf, (B, Hkv, t, D)), packed.slot_view(vbuf, (B, Hkv, t, D))
            out, kbuf, vbuf = torch.ops.kvpass.cache_attention(q[:, :, t:t + 1], *past, k[:, :, t:t + 1],
                                                               v[:, :, t:t + 1], None, False, None, spec, "bench")
        sync(device)
        elapsed = (time.perf_counter() - t0) / steps
    fmt, kept = build_format(spec), None
    if not getattr(fmt, "grows_in_place", False):  # budgeted: the buffer is the layout of its length
        sections = packed.views(packed.whole_buffer(kbuf), fmt.layout(B, Hkv, context + warmup + steps, D, D, q.dtype))
        kept = sections["pos"].sort(-1).values
    return elapsed, stats.calls["policy_replace_in_place"] - before, packed.whole_buffer(kbuf).numel(), out, kept


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=17)  # every length residue mod 16 (Triton specialisation)
    ap.add_argument("--policies", default="snapkv,streaming")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cuda":
        B, Hq, Hkv, D, dtype, context = 8, 32, 8, 128, torch.bfloat16, args.context or 32768
    else:
        B, Hq, Hkv, D, dtype, context = 1, 4, 2, 64, torch.float32, args.context or 4096
    L = context + args.warmup + args.steps
    g = torch.Generator(device=device).manual_seed(0)
    k, v = (torch.randn(B, Hkv, L, D, generator=g, device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(B, Hq, L, D, generator=g, device=device, dtype=dtype)
    rows = []
    runs = [("full", "in place (grows)", None)] + [(p, path, flag) for p in args.policies.split(",")
                                                   for path, flag in (("general", False), ("in place", True))]
    general = None  # (output, kept positions) of the last general row, what the in-place row is checked against
    for policy, path, flag in runs:
        spec = FormatSpec(policy=policy, budget=None if policy == "full" else args.budget,
                          replace_in_place=flag).to_json()
        seconds, served, nbytes, out, kept = time_steps(spec, q, k, v, context, args.steps, args.warmup, device)
        row = dict(policy=policy, path=path, context=context, budget=args.budget if policy != "full" else "",
                   ms_per_step=round(seconds * 1e3, 3), in_place_steps=served, cache_MiB=round(nbytes / 2**20, 1))
        if flag:  # against the general step of the same policy, just run: the same kept tokens, the same output
            row["same_kept"] = bool(torch.equal(kept, general[1]))
            row["max_out_diff"] = f"{(out.float() - general[0].float()).abs().max().item():.1e}"
        elif flag is False:
            general = out, kept
        rows.append(row)
        print(format_table([rows[-1]], COLUMNS).splitlines()[-1], flush=True)
    print()
    print(f"B={B} Hq={Hq} Hkv={Hkv} D={D} {dtype} on {device}; {args.steps} timed steps after {args.warmup}")
    print(format_table(rows, COLUMNS))
    write_json("policy_decode_step.json", {"environment": environment(), "shape": dict(B=B, Hq=Hq, Hkv=Hkv, D=D,
               dtype=str(dtype)), "rows": rows})


if __name__ == "__main__":
    main()
