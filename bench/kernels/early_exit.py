"""Early-exit decode attention on the GPU: blocks read, time and error against the same kernel without
termination, kvpass's split-KV kernel and torch SDPA, on recorded real attention and on random data.

    PYTHONUNBUFFERED=1 python bench/kernels/early_exit.py          # H100: table + $OUT/early_exit.json (< 3 min)
    python bench/kernels/early_exit.py --smoke                     # tiny shapes, CPU interpreter (numbers meaningless)

Data (fp16, Hq=9, Hkv=3, D=64: SmolLM2-135M's attention):
- ``real``: bench/inputs/smollm2_attention.pt (``bench/quality/capture_attention.py``): 3 layers x the last 16 query
  positions of a 2048-token prompt; each (layer, query) is one batch element (B=48) attending over the
  first 2032 keys (a prefix of its causal context).
- ``real x8``: the same, tiled to 16k keys: key 0 (the attention sink) once, then keys 1..2031 repeated 8
  times (the mass spreads over the copies as over a long document that repeats itself).
- ``random``: standard normal q, k, v of the same shapes (nearly uniform attention: nothing to skip).
- ``peaked``: random keys shrunk 20x plus one key per head 25 logits above the rest: where the bound does
  skip, to time the mechanism itself.

Per data set: torch SDPA (enable_gqa), kvpass split-KV decode kernel, the early-exit kernel with
termination off (every block in cache order: the baseline "same kernel"), and with tol in
``TOLERANCES`` (plan in torch + kernel; and the kernel alone). ``read``: blocks read / blocks;
``oracle``: blocks an exact per-block softmax-mass oracle would need to read for the same criterion (a
ceiling for any bound); ``err``: the largest per-row relative L2 error against float64 full attention;
``excess``: the largest per-row relative L2 difference from the same kernel without termination (what
early exit adds to rounding: the proof says <= tol, up to rounding); ``excess/tol``. Times: CUDA-graph replay
(steady decode loop), median; ``bench/common.py``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.paths import SMOLLM2_ATTENTION  # noqa: E402

SMOKE = "--smoke" in sys.argv or not torch.cuda.is_available()
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

from bench.common import Timing, environment, format_table, time_cold, time_graph, write_json  # noqa: E402
from lowering.attention.decode.launcher import decode_attention  # noqa: E402
from lowering.attention.early_exit import bound as ee  # noqa: E402
from lowering.attention.early_exit.launcher import bounded_attention_triton  # noqa: E402

TOLERANCES = (0.0, 1e-4, 1e-3, 1e-2)
DATA = SMOLLM2_ATTENTION


def real_data(tile: int, device, prefix: int | None = None):
    rec = torch.load(DATA)
    layers = list(rec["layers"].values())
    queries = rec["queries"]
    L = rec["tokens"] - queries if prefix is None else prefix
    q = torch.cat([lay["q"][0].transpose(0, 1)[:, :, None] for lay in layers])  # [3 * 16, Hq, 1, D]
    k = torch.cat([lay["k"][:, :, :L].expand(queries, -1, -1, -1) for lay in layers])
    v = torch.cat([lay["v"][:, :, :L].expand(queries, -1, -1, -1) for lay in layers])
    if tile > 1:
        k = torch.cat([k[:, :, :1]] + [k[:, :, 1:]] * tile, 2)
        v = torch.cat([v[:, :, :1]] + [v[:, :, 1:]] * tile, 2)
    return q.to(device).contiguous(), k.to(device).contiguous(), v.to(device).contiguous(), layers[0]["scale"]


def random_data(like, seed: int = 0):
    q, k, v, scale = like
    g = torch.Generator(device=q.device).manual_seed(seed)
    rand = lambda t: torch.randn(t.shape, generator=g, device=t.device).to(t.dtype)  # noqa: E731
    return rand(q), rand(k), rand(v), scale


def peaked_data(like, gap: float = 25.0):
    q, k, v, scale = random_data(like, 1)
    B, Hkv, L, D = k.shape
    k = k.float() * 0.05
    q_mean = q.float().reshape(B, Hkv, -1, D).mean(2)
    k[:, :, L // 3] = gap / scale * q_mean / q_mean.square().sum(-1, keepdim=True)
    return q, k.to(q.dtype), v, scale


def reference(q, k, v, scale):
    """float64 attention [B, Hq, 1, D] and the float64 scores [B, Hq, L]."""
    G = q.shape[1] // k.shape[1]
    s = (q.double() * scale) @ k.double().repeat_interleave(G, 1).transpose(-1, -2)
    return torch.softmax(s, -1) @ v.double().repeat_interleave(G, 1), s[:, :, 0]


def oracle_fraction(s, v, order, tol):
    """Blocks an exact block-mass oracle reads: the plan's order and criterion, with W = Z_U exactly (the
    tightest weight bound any summary could give). s: float64 scores [B, Hq, L]; order [B, Hkv, nb]."""
    B, Hq, L = s.shape
    Hkv, nb = order.shape[1], order.shape[2]
    G, pad = Hq // Hkv, nb * ee.BLOCK - L
    sb = F.pad(s, (0, pad), value=-math.inf).view(B, Hkv, G, nb, ee.BLOCK)
    top = sb.amax((-1, -2), keepdim=True)
    e = torch.exp(sb - top)
    vb = F.pad(v.double(), (0, 0, 0, pad)).view(B, Hkv, nb, ee.BLOCK, -1)
    idx = order.long()[:, :, None].expand(B, Hkv, G, nb)
    mass = e.sum(-1).gather(-1, idx)  # [B, Hkv, G, nb] in visiting order
    acc = torch.einsum("bhgnk,bhnkd->bhgnd", e, vb).gather(3, idx[..., None].expand(*idx.shape, vb.shape[-1]))
    z_read = torch.cat([mass.new_zeros(B, Hkv, G, 1), mass.cumsum(-1)], -1)
    acc_read = torch.cat([acc.new_zeros(B, Hkv, G, 1, acc.shape[-1]), acc.cumsum(3)], 3)
    norm = acc_read.norm(dim=-1) / z_read.clamp_min(1e-300)
    z_rest = z_read[..., -1:] - z_read
    vn = F.pad(v.double().norm(dim=-1), (0, pad)).view(B, Hkv, nb, ee.BLOCK).amax(-1).gather(-1, order.long())
    v_rest = torch.cat([vn.flip(-1).cummax(-1).values.flip(-1), vn.new_zeros(B, Hkv, 1)], -1)[:, :, None]
    r = z_rest / (z_read + z_rest)
    ok = (r * (v_rest + norm) <= tol * norm).all(2)
    ok[..., -1] = True
    return (ok.int().argmax(-1).double().mean() / nb).item()


def timed(fn, smoke):
    if smoke:  # one interpreted call: the smoke run checks that everything runs, not speed
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        return Timing(elapsed, elapsed, elapsed)
    try:
        return time_graph([fn])
    except Exception:  # noqa: BLE001  (a capture failure: fall back to eager timing, flagged in the row)
        return time_cold(fn)


def bench_case(name, data, smoke):
    q, k, v, scale = data
    B, Hq, _, D = q.shape
    L = k.shape[2]
    summaries = ee.build_summaries(k, v)
    ref, scores = reference(q, k, v, scale)
    ref_norm = ref.norm(dim=-1)
    rows = []
    base = dict(data=name, B=B, L=L)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)  # noqa: E731
    split = lambda: decode_attention(q, k, v, scale=scale)  # noqa: E731
    no_exit = lambda: bounded_attention_triton(q, k, v, None, None, scale, 0.0, early_exit=False)  # noqa: E731
    t_base = timed(no_exit, smoke)
    off = no_exit()[0]
    for label, fn in (("torch SDPA", sdpa), ("split-KV kernel", split), ("early-exit kernel, off", no_exit)):
        t = t_base if fn is no_exit else timed(fn, smoke)
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        err = ((out.double() - ref).norm(dim=-1) / ref_norm).max().item()
        rows.append({**base, "method": label, "tol": "", "read": "1.000", "us": f"{t.us:.1f}",
                     "speedup": f"{t_base.median / t.median:.2f}", "err": f"{err:.1e}"})
    for tol in (0.0, 1e-3) if smoke else TOLERANCES:
        plan = ee.plan_visits(q, summaries, L, None, scale)
        out, read = bounded_attention_triton(q, k, v, plan, None, scale, tol)
        t_kernel = timed(lambda: bounded_attention_triton(q, k, v, plan, None, scale, tol), smoke)
        t_full = timed(lambda: ee.bounded_attention(q, k, v, summaries, None, scale, tol), smoke)
        err = ((out.double() - ref).norm(dim=-1) / ref_norm).max().item()
        # What early exit adds to the same kernel's rounding: the quantity the bound controls (<= tol).
        excess = ((out.double() - off.double()).norm(dim=-1) / off.double().norm(dim=-1)).max().item()
        frac = read.double().sum().item() / plan.blocks_total
        rows.append({**base, "method": "early exit (plan + kernel)", "tol": f"{tol:g}", "read": f"{frac:.3f}",
                     "oracle": f"{oracle_fraction(scores, v, plan.order, tol):.3f}", "us": f"{t_full.us:.1f}",
                     "kernel_us": f"{t_kernel.us:.1f}", "speedup": f"{t_base.median / t_full.median:.2f}",
                     "err": f"{err:.1e}", "excess": f"{excess:.1e}",
                     "excess/tol": f"{excess / tol:.2f}" if tol else "-"})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    args = parser.parse_args()
    smoke = args.smoke or SMOKE
    device = "cpu" if smoke else "cuda"
    real = real_data(1, device, prefix=96 if smoke else None)
    if smoke:
        real = tuple(t[:2] for t in real[:3]) + (real[3],)
    cases = [("real", real), ("random", random_data(real)), ("peaked", peaked_data(real))]
    if not smoke:
        long = real_data(8, device)
        cases += [("real x8", long), ("random x8", random_data(long)), ("peaked x8", peaked_data(long))]
    rows = []
    for name, data in cases:
        rows += bench_case(name, data, smoke)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    columns = ["data", "B", "L", "method", "tol", "read", "oracle", "us", "kernel_us", "speedup", "err", "excess",
               "excess/tol"]
    table = format_table(rows, columns)
    path = write_json("early_exit.json", {"environment": environment(), "smoke": smoke, "block": ee.BLOCK,
                                          "rows": rows})
    print(table)
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
