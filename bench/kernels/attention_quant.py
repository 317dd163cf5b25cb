"""Decode attention over quantized KV caches on the GPU: each scheme's fused kernel against torch SDPA
on the bf16 cache and against its own byte floor, in one run.

    PYTHONUNBUFFERED=1 python bench/kernels/attention_quant.py             # H100: the table, JSON to $OUT
    python bench/kernels/attention_quant.py --smoke                        # tiny shapes, CPU interpreter
    python bench/kernels/attention_quant.py --json results.json --schemes 8 4

Shapes: Hq=32, Hkv=8, D=128, one query row, bf16, (B, L) in (1, 32k), (8, 32k), (32, 8k), no mask.
Per row: the kernel's time and SDPA's (``enable_gqa``, bf16 cache) by CUDA-graph replay over input sets
4x the L2 (``bench.common.time_graph``, the steady state of a graphed decode loop); the byte floor =
bytes the kernel must read (every packed section it reads, scales included; aligned: high parts always,
low parts for the tokens the kernel counted) + q and out, over the copy bandwidth measured in the same
run; the max abs error of the kernel vs float64 attention over the *dequantized* cache (kernel
correctness; its output poisoned with NaN first) and the relative error vs float64 attention over the
bf16 cache (the scheme's quality); KV bytes per token measured from the buffer the scheme allocates
(``lowering.packed.allocate``) vs bf16's 512. Aligned runs twice: on Gaussian data and with an attention
sink (key 0 of every head dominating, as in real LLMs), where its skip rule can leave low parts unread.
Targets (issue 5): int8 >= 1.8x and int4 >= 3.0x faster than SDPA, each >= 80% of its own floor.
Default rows: int8, fp8, int4 (the targets' schemes); ``--schemes 8 4 fp8 aligned`` adds the aligned rows.
Robustness: a failing row (OOM included) is reported and the others still run; each row is printed and
the JSON rewritten as soon as it is done, so a run cut off keeps what it measured; rows past
``--budget-s`` (default 100 s) are listed as skipped. Extra input sets for the timing are copies of the
packed buffer (``lowering.packed.views``), not fresh quantizations. GPU time about 1 minute by default.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import os
import sys
import time
import traceback
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

if "--smoke" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

from bench.common import copy_bandwidth, environment, format_table, poison_, time_graph, write_json  # noqa: E402
from bench.kernels.attention_decode import reference, sdpa  # noqa: E402
from lowering.attention.decode import launcher  # noqa: E402
from lowering.attention.decode.launcher import DecodeAttentionConfig  # noqa: E402
from lowering.attention.grid import sm_count  # noqa: E402
from lowering.core.packed import allocate, views  # noqa: E402
from lowering.formats.launch import kernel_decode_attention  # noqa: E402
from lowering.storage import SCHEMES  # noqa: E402

HQ, HKV, HEAD_DIM = 32, 8, 128
SHAPES = [(1, 32768), (8, 32768), (32, 8192)]
# int8 with one or both of its kernel paths switched back, timed in the same run as the scheme itself:
# "convert" converts every key and value code to bf16 from row-major sections (session 8's kernel),
# "split" only scores keys by the query's int8 split, "blocked" only reads token-blocked values;
# int4 with its keys dequantized (session 10's key path) instead of scored by the folded query's int8 split;
# "4-fragments" / "4-triton": int4 with the fragment kernel (lowering/attention/decode/int4_fragments.py) on where it
# serves / off (the Triton kernel everywhere).
SCHEME_VARIANTS = {"8-convert": ("8", dict(split_query=False, blocked_values=False)),
                   "8-split": ("8", dict(blocked_values=False)),
                   "8-blocked": ("8", dict(split_query=False)),
                   "4-dequant": ("4", dict(split_query=False, fragment_kernel=False)),
                   "4-fragments": ("4", dict(fragment_kernel=True)),
                   "4-triton": ("4", dict(fragment_kernel=False))}
SCHEME_ROWS = ([("8", "normal"), ("4", "normal"), ("fp8", "normal"), ("aligned", "normal"), ("aligned", "sink")]
               + [(key, "normal") for key in SCHEME_VARIANTS])
DEFAULT_SCHEMES = ("8", "fp8", "4")
TARGET_SPEEDUP = {"8": 1.8, "4": 3.0}
DEVICE = "cuda"
DTYPE = torch.bfloat16
COLUMNS = ["scheme", "data", "B", "L", "kernel_us", "sdpa_bf16_us", "speedup", "floor_us", "of_floor",
           "kv_bytes_per_token", "vs_bf16_bytes", "read_vs_bf16", "low_read", "max_err_vs_deq", "rel_err_vs_bf16",
           "target"]


def scheme_of(key: str):
    """The registered scheme of ``key``, or a ``SCHEME_VARIANTS`` copy of one with attributes switched."""
    if key not in SCHEME_VARIANTS:
        return SCHEMES[key]
    base, attributes = SCHEME_VARIANTS[key]
    scheme = copy.copy(SCHEMES[base])
    for name, value in attributes.items():
        setattr(scheme, name, value)
    return scheme


def make_cache(batch: int, kv_len: int, data: str, seed: int):
    """q [B, Hq, 1, D] (a transposed view, as HF hands it over), k, v [B, Hkv, L, D] bf16."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(batch, 1, HQ, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=g).transpose(1, 2)
    k = torch.randn(batch, HKV, kv_len, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=g)
    v = torch.randn(batch, HKV, kv_len, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=g)
    if data == "sink":  # key 0 aligned with its heads' mean query, logit ~ 4 ln L above the rest
        q_mean = q.float().reshape(batch, HKV, -1, HEAD_DIM).mean(2)
        sink = 4 * math.log(kv_len) * math.sqrt(HEAD_DIM) * q_mean / q_mean.square().sum(-1, keepdim=True)
        k[:, :, 0] = sink.to(DTYPE)
    return q, k, v


def pack(scheme, k, v):
    B, H, L, D = k.shape
    buffer, state = allocate(scheme.layout(B, H, L, D, D, k.dtype), k.device)
    scheme.append(None, 0, k, v, state)
    return buffer, state


def copies(scheme, buffer, k, count: int) -> list[dict]:
    """``count`` more packed states holding the same cache in buffers of their own (L2 rotation)."""
    B, H, L, D = k.shape
    layout = scheme.layout(B, H, L, D, D, k.dtype)
    return [views(buffer.clone(), layout) for _ in range(count)]


def extra_sets(nbytes: int, l2_bytes: int) -> int:
    """Input sets beyond the first so that rotating over them streams 4x the L2 (at most 3 more)."""
    return max(0, min(3, math.ceil(4 * l2_bytes / max(1, nbytes)) - 1))


def floor_bytes(key: str, state: dict, q: torch.Tensor, low_fraction: float) -> int:
    """Bytes the kernel must move: the sections it reads (aligned: low parts only for the fraction of
    tokens it read them for), q in, out back."""
    total = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        total += nbytes * low_fraction if name.endswith("_low") else nbytes
    return int(total + 2 * q.numel() * q.element_size())


def run_row(key: str, data: str, batch: int, kv_len: int, bw: float, l2_bytes: int, sdpa_cache: dict) -> dict:
    scheme = scheme_of(key)
    row = {"scheme": key, "data": data, "B": batch, "L": kv_len}
    q, k, v = make_cache(batch, kv_len, data, seed=1)
    buffer, state = pack(scheme, k, v)
    row["kv_bytes_per_token"] = round(buffer.numel() / (batch * HKV * kv_len), 1)
    row["vs_bf16_bytes"] = f"{2 * 2 * HEAD_DIM / row['kv_bytes_per_token']:.2f}x"
    # Correctness: poisoned output vs float64 over the dequantized cache; quality vs the bf16 cache.
    stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    options = {"stats": stats} if key == "aligned" else {}
    out = poison_(torch.empty(q.shape, device=DEVICE, dtype=DTYPE))
    kernel_decode_attention(scheme, q, state, kv_len, None, None, out=out, **options)
    # int8 / fp8 kernels attend over the exact products code * scale (see tests/lowering/storage/test_schemes.py)
    kd, vd = scheme.dequantize(state, kv_len, torch.float32 if getattr(scheme, "kernel_attends_over_products", False)
                               else DTYPE)
    ref_deq = reference(q, kd, vd, None)
    del kd, vd
    ref = reference(q, k, v, None)
    row["max_err_vs_deq"] = f"{(out.double() - ref_deq).abs().max().item():.1e}" if out.isfinite().all() else "NaN"
    row["rel_err_vs_bf16"] = f"{((out.double() - ref).norm() / ref.norm()).item():.1e}"
    del ref_deq, ref
    low_fraction = (stats[0] / stats[1].clamp_min(1)).item() if key == "aligned" else 1.0
    if key == "aligned":
        row["low_read"] = f"{low_fraction:.0%}"
    floor_b = floor_bytes(key, state, q, low_fraction)
    row["read_vs_bf16"] = f"{floor_b / (2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()):.2f}"

    # Timing: enough packed input sets that rotating over them streams 4x the L2.
    sets = [(q, state)] + [(q.clone(), st) for st in copies(scheme, buffer, k, extra_sets(buffer.numel(), l2_bytes))]
    fns = [lambda q=q, st=st: kernel_decode_attention(scheme, q, st, kv_len, None, None, **options)
           for q, st in sets]
    ours = time_graph(fns).median
    del sets, fns
    shape = (batch, kv_len)
    if shape not in sdpa_cache:  # SDPA on the bf16 cache, once per shape, same method
        more = extra_sets(2 * k.numel() * k.element_size(), l2_bytes)
        bf16_sets = [(q, k, v)] + [(q.clone(), k.clone(), v.clone()) for _ in range(more)]
        sdpa_cache[shape] = time_graph([lambda q=q, k=k, v=v: sdpa(q, k, v, None) for q, k, v in bf16_sets]).median
        del bf16_sets
    base = sdpa_cache[shape]
    row.update(kernel_us=f"{ours * 1e6:.1f}", sdpa_bf16_us=f"{base * 1e6:.1f}", speedup=f"{base / ours:.2f}x",
               floor_us=f"{floor_b / bw * 1e6:.1f}", of_floor=f"{floor_b / bw / ours:.0%}")
    target = TARGET_SPEEDUP.get(key)
    row["target"] = "" if target is None else (
        "met" if base / ours >= target and floor_b / bw / ours >= 0.8 else f"missed ({target}x, 80%)")
    row["raw"] = {"kernel_s": ours, "sdpa_s": base, "floor_bytes": floor_b, "floor_s": floor_b / bw,
                  "buffer_bytes": buffer.numel(), "aligned_stats": stats.tolist()}
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (no GPU)")
    parser.add_argument("--json", default=None, help="output path (default: $OUT/attention_quant.json)")
    parser.add_argument("--schemes", nargs="*", default=list(DEFAULT_SCHEMES),
                        help=f"kv_bits values (default {' '.join(DEFAULT_SCHEMES)}; 'aligned' adds its two rows)")
    parser.add_argument("--budget-s", type=float, default=100.0,
                        help="rows not started within this many seconds are listed as skipped")
    parser.add_argument("--sweep", action="store_true",
                        help="time a grid of tile configurations per scheme and shape instead (tuning the rule)")
    parser.add_argument("--grid", nargs="*", default=None, metavar="FIELD=V1,V2",
                        help="with --sweep: vary only these config fields, the rest as the rule picks them "
                             "(e.g. block_n=32,64 num_warps=2,4; none for None: max_registers=none,168)")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM,
                        help=f"D (default {HEAD_DIM}; 64: the Llama-3.2-1B shape of issue #25's D=64 targets)")
    args = parser.parse_args()
    set_head_dim(args.head_dim)
    if args.smoke or not torch.cuda.is_available():
        smoke()
    env = environment()
    bw = copy_bandwidth()
    env["copy_bandwidth_TBps"] = round(bw / 1e12, 3)
    print("environment:", env, flush=True)
    l2_bytes = int(env.get("l2_mib", 50) * 2**20) if DEVICE == "cuda" else 0  # smoke: one input set
    if args.sweep:
        return sweep(args, env, bw, l2_bytes)
    rows, sdpa_cache = [], {}
    started = time.monotonic()
    path = args.json
    for batch, kv_len in SHAPES:
        for key, data in SCHEME_ROWS:
            if key not in args.schemes:
                continue
            if time.monotonic() - started > args.budget_s:
                rows.append({"scheme": key, "data": data, "B": batch, "L": kv_len,
                             "target": f"skipped (past --budget-s {args.budget_s:g})"})
                continue
            try:
                rows.append(run_row(key, data, batch, kv_len, bw, l2_bytes, sdpa_cache))
            except Exception as e:  # noqa: BLE001 - keep the other rows (OOM, a compile failure)
                traceback.print_exc()
                rows.append({"scheme": key, "data": data, "B": batch, "L": kv_len,
                             "target": f"FAILED: {type(e).__name__}: {str(e)[:80]}"})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print("row:", {c: rows[-1].get(c) for c in COLUMNS if c in rows[-1]}, flush=True)
            path = save({"environment": env, "shape": shape(), "rows": rows}, args.json)
    print(f"\n{env.get('gpu')}; torch {env['torch']}; triton {env['triton']}; copy bandwidth {bw / 1e12:.2f} TB/s;"
          f" Hq={HQ} Hkv={HKV} D={HEAD_DIM} bf16; json: {path}")
    print(format_table(rows, COLUMNS))


# Tile grids of the sweep: int4 tiles stay inside one key group (the launcher caps BLOCK_N at the group).
SWEEP_GRID = {
    "8": dict(block_n=(64, 128, 256), num_warps=(4, 8), num_stages=(2, 3, 4), programs_per_sm=(1, 2, 4)),
    "fp8": dict(block_n=(64, 128, 256), num_warps=(4, 8), num_stages=(2, 3, 4), programs_per_sm=(1, 2, 4)),
    "4": dict(block_n=(32, 64, 128), num_warps=(2, 4, 8), num_stages=(3, 5, 7), programs_per_sm=(1, 2, 4, 8)),
    "4-fragments": dict(num_stages=(1, 2), programs_per_sm=(8, 16, 32), min_blocks_per_split=(4, 16),
                        whole_waves=(False, True)),
}
FRAGMENT_SWEEP = "4-fragments"  # its grid is the fragment kernel's split rule (launcher.FRAGMENT_CONFIG)


def sweep(args, env: dict, bw: float, l2_bytes: int) -> None:
    """Every configuration of ``SWEEP_GRID`` per scheme and shape: kernel time (CUDA-graph replay, as the
    table) and its fraction of the scheme's byte floor; prints the best per (scheme, shape). ``FRAGMENT_SWEEP``'s
    configurations replace the fragment kernel's split rule (``launcher.FRAGMENT_CONFIG``), the launch otherwise the
    scheme's own; the others are the Triton kernel's configuration."""
    rows, started = [], time.monotonic()
    for batch, kv_len in SHAPES:
        for key in [s for s in args.schemes if s in SWEEP_GRID or SCHEME_VARIANTS.get(s, ("",))[0] in SWEEP_GRID]:
            scheme = scheme_of(key)
            q, k, v = make_cache(batch, kv_len, "normal", seed=1)
            buffer, state = pack(scheme, k, v)
            floor_b = floor_bytes(key, state, q, 1.0)
            more = copies(scheme, buffer, k, extra_sets(buffer.numel(), l2_bytes))
            sets = [(q, state)] + [(q.clone(), st) for st in more]
            ref = None
            grid = SWEEP_GRID.get(key, SWEEP_GRID.get(SCHEME_VARIANTS.get(key, ("",))[0]))
            split_rule = key == FRAGMENT_SWEEP
            base = launcher.FRAGMENT_CONFIG if split_rule else DecodeAttentionConfig()
            if args.grid:
                grid = {f: tuple(None if x == "none" else int(x) for x in vs.split(","))
                        for f, vs in (g.split("=") for g in args.grid)}
                base = base if split_rule else rule_config(scheme, q, state, kv_len)
            for values in itertools.product(*grid.values()):
                if time.monotonic() - started > args.budget_s:
                    break
                config = dataclasses.replace(base, **dict(zip(grid, values)))
                row = {"scheme": key, "B": batch, "L": kv_len, **dataclasses.asdict(config)}

                def attend(q, st, config=config, split_rule=split_rule):
                    if not split_rule:
                        return kernel_decode_attention(scheme, q, st, kv_len, config=config)
                    with mock.patch.object(launcher, "FRAGMENT_CONFIG", config):
                        return kernel_decode_attention(scheme, q, st, kv_len)

                try:
                    out = attend(q, state)
                    ref = out if ref is None else ref
                    row["max_diff_vs_first"] = (out.float() - ref.float()).abs().max().item()
                    fns = [lambda q=q, st=st: attend(q, st) for q, st in sets]
                    t = time_graph(fns).median
                    row.update(kernel_us=round(t * 1e6, 1), of_floor=round(floor_b / bw / t, 3))
                except Exception as e:  # noqa: BLE001 - out of resources and the like: record, go on
                    row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
                rows.append(row)
            del sets, buffer, state, q, k, v
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            done = [r for r in rows if r["scheme"] == key and (r["B"], r["L"]) == (batch, kv_len) and "kernel_us" in r]
            for r in sorted(done, key=lambda r: r["kernel_us"])[:3]:
                print("best:", r, flush=True)
            save({"environment": env, "shape": shape(), "sweep": rows}, args.json or None)


def rule_config(scheme, q, state, kv_len):
    """The configuration the launcher's rule picks for this problem (``lowering.decode_attention``)."""
    kv = scheme.kernel_operands(q, state, kv_len)
    programs_per_split = q.shape[0] * HKV * max(1, -(-(HQ // HKV) * q.shape[2] // 64))
    return launcher.packed_config(programs_per_split, sm_count(q.device), kv)


def shape() -> dict:
    """The heads and head size every row of a run shares (rows carry B and L)."""
    return {"Hq": HQ, "Hkv": HKV, "D": HEAD_DIM, "dtype": str(DTYPE).removeprefix("torch.")}


def save(payload: dict, path: str | None) -> str | None:
    """Write the rows so far to ``path`` (default $OUT/attention_quant.json); return where."""
    if path is None:
        return write_json("attention_quant.json", payload)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return path


def set_head_dim(head_dim: int) -> None:
    """The run's D (rows carry B and L; the file's ``shape`` carries D)."""
    global HEAD_DIM
    HEAD_DIM = head_dim


def smoke():
    """The whole script on the CPU interpreter with tiny shapes (numbers meaningless)."""
    global DEVICE, SHAPES, HQ, HKV, HEAD_DIM
    DEVICE, SHAPES, HQ, HKV, HEAD_DIM = "cpu", [(1, 300), (2, 70)], 4, 2, 32


if __name__ == "__main__":
    main()
