"""Budgeted-cache hot paths on the GPU: the fused decode scoring kernels against the reference path of the
same step, and the hot-cache gather, each against its byte floor, in one run.

    PYTHONUNBUFFERED=1 python bench/kernels/policy_kernels.py      # H100: the table, JSON to $OUT
    python bench/kernels/policy_kernels.py --smoke                 # tiny shapes, CPU interpreter (numbers meaningless)

Shapes: B=8, Hq=32, Hkv=8, D=128, one query row, bf16, budget 2048, no mask.
Rows:
- ``h2o``: candidates = 2048 hot + 1 new. Kernel: ``score_keys`` (weights over the candidates, raw scores
  kept) + ``kept_attention`` over 2048 kept tokens. Reference (what the CUDA path ran before): explicit
  fp32 weights (``lowering.formats.budgeted.key_weights``) + the split-KV decode kernel over the kept keys and values.
- ``adore``: 2048 hot + 30k cold (int8 codes, fp32 row scales) + 1 new. Kernel: the same two calls, the cold
  segment dequantized in registers. Reference: ``key_weights`` over all keys in bf16 + the decode kernel;
  ``ref+deq`` adds what the reference path does first, dequantizing the cold keys and concatenating them.
- ``write_hot``: moving the kept rows (k and v) into the new buffer: ``take`` + ``copy_`` (the reference)
  and ``torch.gather(out=)`` (no temporary): a Triton gather could only match the latter's bytes.
Selection (a sort of the scores) is the same in both paths and not timed.
Floor: bytes the step must move (keys of every candidate, values of the kept ones, q, out; write_hot: the
kept rows read and written once) over the copy bandwidth measured in the same run; the kernel's own extra
traffic, the fp32 scores written once and read twice, is shown in ``extra MB``. Timing: CUDA-graph replay
of 20 calls, median per call (``bench.common.time_graph``: the device time of a graphed decode loop; one
input set, so part of it may sit in the 50 MB L2), and eager calls after an L2 flush (``*_eager_us``,
``time_cold``: host launch cost included where it exceeds the device time). GPU time about a minute.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

if "--smoke" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
from bench.common import copy_bandwidth, environment, format_table, time_cold, time_graph, write_json  # noqa: E402
from lowering.attention.decode.launcher import decode_attention  # noqa: E402
from lowering.attention.scored.launcher import kept_attention, score_keys  # noqa: E402
from lowering.core.operands import KeySegment  # noqa: E402
from lowering.formats.budgeted import key_weights, take  # noqa: E402
from lowering.storage.int8 import dequantize_rows, quantize_rows  # noqa: E402

DTYPE = torch.bfloat16


def make_step(batch, q_heads, kv_heads, dim, hot, cold, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=DTYPE)  # noqa: E731
    q = rand(batch, q_heads, 1, dim)
    k, v = rand(batch, kv_heads, hot + 1, dim), rand(batch, kv_heads, hot + 1, dim)  # hot then the new token
    codes = scales = None
    if cold:
        c, scales = quantize_rows(rand(batch, kv_heads, cold, dim))
        codes = c.to(torch.int8)
    # kept: every candidate but one per (row, KV head), as a full cache drops one token per decode step
    drop = torch.randint(0, hot + 1 + cold, (batch, kv_heads, 1), generator=g)
    order = torch.arange(hot + 1 + cold).expand(batch, kv_heads, -1)
    idx = order.masked_select(order != drop).reshape(batch, kv_heads, -1)[..., :hot].contiguous().to(device)
    return q, k, v, codes, scales, idx


def run_row(name, args, device, bandwidth):
    B, Hq, Hkv, D, budget = args.batch, args.q_heads, args.kv_heads, args.dim, args.budget
    cold = args.cold if name == "adore" else 0
    q, k, v, codes, scales, idx = make_step(B, Hq, Hkv, D, budget, cold, device)
    scale = 1.0 / math.sqrt(D)
    n_hot = budget
    pos = torch.arange(budget + 1 + cold, device=device).expand(B, Hkv, -1).contiguous()
    if cold:  # candidate order as ADORE's: old hot, cold, new
        segments = [KeySegment(k[:, :, :n_hot]), KeySegment(codes, scales), KeySegment(k[:, :, n_hot:])]
        k_all = torch.cat([k[:, :, :n_hot], dequantize_rows(codes, scales, DTYPE), k[:, :, n_hot:]], 2)
        v_all = torch.cat([v[:, :, :n_hot], dequantize_rows(codes, scales, DTYPE), v[:, :, n_hot:]], 2)
    else:
        segments, k_all, v_all = [KeySegment(k)], k, v
    v_kept = take(v_all, idx).contiguous()
    k_kept = take(k_all, idx).contiguous()
    mean = name == "adore"

    def kernel():
        scored = score_keys(q, segments, pos, None, scale, pos.shape[-1], mean=mean)
        return scored.weights, kept_attention(scored, idx, v_kept)

    def reference():
        w = key_weights(q, k_all, None, scale, mean=mean)
        return w, decode_attention(q, k_kept, v_kept, scale=scale)

    def reference_dequant():
        k_full = torch.cat([k[:, :, :n_hot], dequantize_rows(codes, scales, DTYPE), k[:, :, n_hot:]], 2)
        w = key_weights(q, k_full, None, scale, mean=mean)
        return w, decode_attention(q, k_kept, v_kept, scale=scale)

    w_ker, o_ker = kernel()
    w_ref, o_ref = reference()
    C = pos.shape[-1]
    key_bytes = B * Hkv * (budget + 1) * D * 2 + (B * Hkv * cold * (D + 4) if cold else 0)
    floor_bytes = key_bytes + B * Hkv * budget * D * 2 + 2 * q.numel() * 2
    extra = 3 * B * Hq * C * 4
    t_ker, t_ref = time_graph([kernel]), time_graph([reference])
    row = dict(row=name, C=C, kernel_us=round(t_ker.us, 1), ref_us=round(t_ref.us, 1),
               kernel_eager_us=round(time_cold(kernel).us, 1), ref_eager_us=round(time_cold(reference).us, 1),
               speedup=round(t_ref.median / t_ker.median, 2), floor_us=round(floor_bytes / bandwidth * 1e6, 1),
               of_floor=f"{floor_bytes / bandwidth / t_ker.median:.0%}", extra_MB=round(extra / 1e6, 1),
               w_rel_err=f"{((w_ker.double() - w_ref.double()).norm() / w_ref.double().norm()).item():.1e}",
               out_max_err=f"{(o_ker.double() - o_ref.double()).abs().max().item():.1e}")
    if cold:
        t_deq = time_graph([reference_dequant])
        row.update(ref_deq_us=round(t_deq.us, 1), speedup_deq=round(t_deq.median / t_ker.median, 2))
    return row


def write_hot_row(args, device, bandwidth):
    B, Hkv, D, budget = args.batch, args.kv_heads, args.dim, args.budget
    _, k, v, _, _, idx = make_step(B, args.q_heads, Hkv, D, budget, 0, device)
    out_k, out_v = torch.empty_like(k[:, :, :budget]), torch.empty_like(v[:, :, :budget])
    full_idx = idx[..., None].expand(*idx.shape, D)

    def reference():
        out_k.copy_(take(k, idx))
        out_v.copy_(take(v, idx))

    def gather_out():
        torch.gather(k, 2, full_idx, out=out_k)
        torch.gather(v, 2, full_idx, out=out_v)

    floor_bytes = 2 * 2 * B * Hkv * budget * D * 2 + 2 * idx.numel() * 8
    t_ref, t_gat = time_graph([reference]), time_graph([gather_out])
    return dict(row="write_hot", C=budget + 1, kernel_us=round(t_gat.us, 1), ref_us=round(t_ref.us, 1),
                speedup=round(t_ref.median / t_gat.median, 2), floor_us=round(floor_bytes / bandwidth * 1e6, 1),
                of_floor=f"{floor_bytes / bandwidth / t_gat.median:.0%}", extra_MB=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--cold", type=int, default=30 * 1024, help="ADORE cold-store tokens")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu":
        args.batch, args.q_heads, args.kv_heads, args.dim, args.budget, args.cold = 1, 4, 2, 32, 40, 60
    bandwidth = copy_bandwidth(device=device)
    rows = []
    for name in ("h2o", "adore"):
        rows.append(run_row(name, args, device, bandwidth))
        print(f"done {name}", file=sys.stderr, flush=True)
    rows.append(write_hot_row(args, device, bandwidth))
    columns = ["row", "C", "kernel_us", "ref_us", "speedup", "kernel_eager_us", "ref_eager_us", "ref_deq_us",
               "speedup_deq", "floor_us", "of_floor",
               "extra_MB", "w_rel_err", "out_max_err"]
    env = environment()
    print(f"{env.get('gpu', 'cpu')}  B={args.batch} Hq={args.q_heads} Hkv={args.kv_heads} D={args.dim} "
          f"budget={args.budget} cold={args.cold} bf16  copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(format_table(rows, columns))
    path = write_json("policy_kernels.json", {"env": env, "args": vars(args), "rows": rows})
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
