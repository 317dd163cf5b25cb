"""ART's stability test against kvpass's proven stop, on real SmolLM2 attention (CPU, float32 torch).

    python bench/analysis/art_criterion.py            # the tables of bench/RESULTS.md ("Early exit: ART's test")

ART (arXiv 2606.00024) stops reading KV blocks once the running output looks settled: the relative
change of the output under ``mag``, 1 - cosine under ``dir``, for ``patience`` consecutive blocks. This
replays that test on the q, K, V recorded from SmolLM2-135M (``bench/inputs/smollm2_attention.pt``, 3
layers, 2,048 tokens, 16 decode queries; "x8": the cache tiled 8 times, 16k tokens of many blocks of
similar mass), visiting blocks in kvpass's order (``lowering.early_exit.plan_visits``: newest block, then
by bound), and reports the blocks read and the largest relative L2 error of a query row against full
attention. A second table: the fewest value rows any stop could read at tolerance 1e-3 when every score
is known exactly (an oracle for "read the keys, skip the values": the proven criterion of
``lowering.early_exit`` with the exact unread mass in place of its bound), per block size.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.paths import SMOLLM2_ATTENTION  # noqa: E402
from lowering.attention.early_exit import bound as early_exit  # noqa: E402

DATA = SMOLLM2_ATTENTION
ART_SETTINGS = ((1e-7, 1e-3, 5), (1e-3, 1e-3, 5), (1e-2, 1e-3, 5), (3e-2, 1e-3, 3))  # (mag, dir, patience)


def prefix_outputs(q, k, v, scale):
    """Outputs after each prefix of the visiting order: [B, Hkv, R, nb, D] (R = query rows of a group)."""
    L, nb, blk = k.shape[2], early_exit.num_blocks(k.shape[2]), early_exit.BLOCK
    plan = early_exit.plan_visits(q, early_exit.build_summaries(k, v), L, None, scale)
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    R = Hq // Hkv * Lq
    s = (q.float() * scale).reshape(B, Hkv, R, D) @ k.float().transpose(-1, -2)
    s = F.pad(s, (0, nb * blk - L), value=-math.inf).view(B, Hkv, R, nb, blk)
    e = torch.exp(s - s.amax((-1, -2), keepdim=True))
    vb = F.pad(v.float(), (0, 0, 0, nb * blk - L)).view(B, Hkv, nb, blk, -1)
    order = plan.order.long()
    mass = e.sum(-1).gather(-1, order[:, :, None].expand(B, Hkv, R, nb))
    acc = torch.einsum("bhrnk,bhnkd->bhrnd", e, vb).gather(3, order[:, :, None, :, None].expand(B, Hkv, R, nb, D))
    return acc.cumsum(3) / mass.cumsum(-1)[..., None]


def art_stop(out, mag: float, dirn: float, patience: int):
    """(fraction of blocks read, largest relative error of a row) when ART's test stops each group."""
    nb = out.shape[3]
    prev, cur = out[:, :, :, :-1], out[:, :, :, 1:]
    rel = (cur - prev).norm(dim=-1) / prev.norm(dim=-1)
    cos = (cur * prev).sum(-1) / (cur.norm(dim=-1) * prev.norm(dim=-1))
    stable = ((rel < mag) & (1 - cos < dirn)).all(2).float()  # a block can be skipped only if every row settled
    run, hit = torch.zeros_like(stable[..., 0]), torch.zeros_like(stable, dtype=torch.bool)
    for j in range(stable.shape[-1]):
        run = (run + 1) * stable[..., j]
        hit[..., j] = run >= patience
    stop = torch.where(hit.any(-1), hit.float().argmax(-1) + 2, torch.full_like(run, nb)).long()  # blocks read
    got = out.gather(3, (stop - 1)[:, :, None, None, None].expand(*out.shape[:3], 1, out.shape[-1]))[:, :, :, 0]
    full = out[:, :, :, -1]
    return (stop.float() / nb).mean().item(), ((got - full).norm(dim=-1) / full.norm(dim=-1)).max().item()


def exact_score_oracle(q, k, v, scale, block: int, tol: float = 1e-3) -> float:
    """Fraction of value blocks a stop must read per query row when the unread mass is known exactly
    (blocks by decreasing mass over the group; criterion r (Vmax_U + |o_R|) <= tol |o_R|)."""
    B, Hq, Lq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G, nb = Hq // Hkv, -(-L // block)
    w = torch.softmax(torch.einsum("bhgqd,bhnd->bhgqn", q.double().view(B, Hkv, G, Lq, D), k.double()) * scale, -1)
    pad = nb * block - L
    wb = F.pad(w, (0, pad)).view(B, Hkv, G, Lq, nb, block)
    vb = F.pad(v.double(), (0, 0, 0, pad)).view(B, Hkv, nb, block, D)
    vmax = vb.norm(dim=-1).amax(-1)
    read = []
    for b in range(B):
        for h in range(Hkv):
            for i in range(Lq):
                order = wb[b, h, :, i].sum(-1).amax(0).argsort(descending=True)
                wt = wb[b, h, :, i][:, order]  # [G, nb, block]
                o_r = torch.einsum("gnk,nkd->gnd", wt, vb[b, h][order]).cumsum(1)
                mass = wt.sum(-1).cumsum(1)
                o_r = o_r / mass[..., None]
                v_rest = torch.cat([vmax[b, h][order].flip(0).cummax(0).values.flip(0)[1:], vmax.new_zeros(1)])
                ok = ((1 - mass) * (v_rest + o_r.norm(dim=-1)) <= tol * o_r.norm(dim=-1)).all(0)
                read.append((int(ok.float().argmax()) + 1 if ok.any() else nb) / nb)
    return sum(read) / len(read)


def main():
    layers = torch.load(DATA)["layers"]
    print("ART's stability test (blocks of", early_exit.BLOCK, "keys, kvpass's visiting order)")
    print("| cache | mag | dir | patience | blocks read (layers " + ", ".join(map(str, layers)) + ") | max row error |")
    print("|---|---|---|---|---|---|")
    for tile in (1, 8):
        outs = [prefix_outputs(r["q"].float(), r["k"].float().repeat(1, 1, tile, 1),
                               r["v"].float().repeat(1, 1, tile, 1),
                               r["scale"]) for r in layers.values()]
        for mag, dirn, patience in ART_SETTINGS:
            res = [art_stop(o, mag, dirn, patience) for o in outs]
            print(f"| {2048 * tile} tokens | {mag:g} | {dirn:g} | {patience} | "
                  f"{' / '.join(f'{r[0]:.2f}' for r in res)} | {' / '.join(f'{r[1]:.1e}' for r in res)} |", flush=True)
    print("\nExact-score oracle at tol 1e-3: fraction of value blocks read (2,048 tokens, decode rows one at a time)")
    for block in (1, 16, 64):
        fr = [exact_score_oracle(r["q"], r["k"], r["v"], r["scale"], block) for r in layers.values()]
        print(f"| block {block} | {' / '.join(f'{f:.2f}' for f in fr)} | mean {sum(fr) / len(fr):.2f} |", flush=True)


if __name__ == "__main__":
    main()
