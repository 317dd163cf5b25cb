"""How much int8's Hadamard rotation cuts the attention error on real SmolLM2 attention (CPU, seconds).

    python bench/kernels/int8_rotation.py        # the table of bench/RESULTS.md ("int8 rows stored rotated")

On the captured layers of ``bench/inputs/smollm2_attention.pt`` (``bench/quality/capture_attention.py``): the mean
relative L2 error, against float64 attention over the unquantized cache, of attention over the int8
cache as ``lowering.storage.int8`` stores it, with and without the rotation (the scheme's own append and
dequantize), and with the rotated query rounded to bf16 as the fused kernel receives it (``kernel_query``,
output turned back in fp32 by ``kernel_output`` and rounded to bf16, as the kernel does in registers), and
with the key scores from that query's 16-bit split (``split_kernel_query``), as the kernel scores int8 keys.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.paths import SMOLLM2_ATTENTION  # noqa: E402
from lowering.core.packed import allocate  # noqa: E402
from lowering.core.reference import exact_attention  # noqa: E402
from lowering.storage import SCHEMES  # noqa: E402

DATA = SMOLLM2_ATTENTION


def attention(q, k, v, scale):
    return exact_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def stored(scheme, k, v):
    B, H, L, D = k.shape
    _, state = allocate(scheme.layout(B, H, L, D, v.shape[-1], torch.float32), "cpu")
    scheme.append(None, 0, k, v, state)
    return state


def relative_error(out, ref):
    return ((out.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).mean().item()


def rows(path: Path = DATA) -> list[dict]:
    data = torch.load(path, weights_only=False)
    rotated = SCHEMES["8"]
    plain = rotated.without_rotation()
    out = []
    for layer, t in data["layers"].items():
        q, k, v = (t[n].double() for n in "qkv")
        ref = attention(q, k, v, t["scale"])
        row = {"layer": int(layer)}
        plain_kv = plain.dequantize(stored(plain, k.float(), v.float()), k.shape[2], torch.float64)
        state = stored(rotated, k.float(), v.float())
        rotated_kv = rotated.dequantize(state, k.shape[2], torch.float64)
        for name, (kd, vd) in (("per_token", plain_kv), ("rotated", rotated_kv)):
            row[name] = relative_error(attention(q, kd, vd, t["scale"]), ref)
        # what the kernel computes: the bf16 query rotated and rounded, over the stored rows, turned back
        ks, vs = (rotated.code_rows(state, n, k.shape[2]).double() * state[n + "_scale"].double().unsqueeze(-1)
                  for n in "kv")
        qr = rotated.kernel_query(q.to(torch.bfloat16)).double()
        raw = attention(qr, ks, vs, t["scale"]).float()
        row["rotated_bf16_query"] = relative_error(rotated.kernel_output(raw, torch.bfloat16).double(), ref)
        # the key scores by the rotated query's 16-bit split (weights still from those scores, values as above)
        q_split = rotated.split_kernel_query(q.to(torch.bfloat16))
        scores = (q_split @ ks.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) * t["scale"]
        raw = (scores.softmax(-1) @ vs.repeat_interleave(q.shape[1] // k.shape[1], 1)).float()
        row["rotated_split_query"] = relative_error(rotated.kernel_output(raw, torch.bfloat16).double(), ref)
        row["per_token_bf16_query"] = relative_error(attention(q.to(torch.bfloat16).double(), *plain_kv, t["scale"]),
                                                     ref)
        out.append(row)
    return out


def main():
    print("layer | per-token int8 | rotated | per-token, bf16 query | rotated, bf16 query "
          "| rotated, split query (kernel)")
    for r in rows():
        print(f"{r['layer']} | {r['per_token']:.2e} | {r['rotated']:.2e} | {r['per_token_bf16_query']:.2e} | "
              f"{r['rotated_bf16_query']:.2e} | {r['rotated_split_query']:.2e}")


if __name__ == "__main__":
    main()
