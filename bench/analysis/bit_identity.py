"""Bit identity of every kvpass variant between two revisions: the proof a refactoring changed no output.

For each revision, in a subprocess of its own (a ``git worktree`` of the revision in a temporary folder, first
on ``sys.path``), every variant (each ``kv_bits``, each policy with a budget, early exit, and combinations)
runs on tiny random-init zoo models (``tests/zoo.py`` of THIS checkout, so both revisions see the same
models): batch 1, and batch 3 with left padding; a prefill, then greedy decode steps, each fed the argmax of
the previous logits. The last-position logits of every step and the generated tokens are saved, and the two
revisions' are compared with ``torch.equal``. Prints a table; exits 1 on any difference, missing run or
error in one revision only.

    python bench/analysis/bit_identity.py 78ee655 HEAD                # CPU (the references)
    KVPASS_TEST_DEVICE=cuda python bench/analysis/bit_identity.py 78ee655 HEAD   # GPU: the Triton kernels
    python bench/analysis/bit_identity.py --run out.pt                # this checkout only (e.g. where there is no git)
    python bench/analysis/bit_identity.py --compare base.pt head.pt
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ZOO_DIR = REPO / "tests"

# (name, options): every kv_bits, every policy with a budget below the prompt (evictions at prefill and while
# decoding), early exit, and combinations of the three.
VARIANTS = [
    ("exact", {}),
    ("kv_bits=8", {"kv_bits": 8}),
    ("kv_bits=4", {"kv_bits": 4}),
    ("kv_bits=fp8", {"kv_bits": "fp8"}),
    ("kv_bits=aligned", {"kv_bits": "aligned"}),
    ("streaming", {"policy": "streaming", "budget": 6}),
    ("h2o", {"policy": "h2o", "budget": 6}),
    ("snapkv", {"policy": "snapkv", "budget": 6}),
    ("asl", {"policy": "asl", "budget": 6}),
    ("adore", {"policy": "adore", "budget": 6}),
    ("early_exit", {"early_exit": True}),
    ("early_exit=0.05", {"early_exit": 0.05}),
    ("kv_bits=8 early_exit", {"kv_bits": 8, "early_exit": True}),
    ("snapkv kv_bits=8", {"policy": "snapkv", "budget": 6, "kv_bits": 8}),
    ("h2o kv_bits=fp8", {"policy": "h2o", "budget": 6, "kv_bits": "fp8"}),
    ("adore kv_bits=4", {"policy": "adore", "budget": 6, "kv_bits": 4}),
    ("streaming kv_bits=aligned", {"policy": "streaming", "budget": 6, "kv_bits": "aligned"}),
    ("asl kv_bits=8", {"policy": "asl", "budget": 6, "kv_bits": 8}),
    ("h2o early_exit", {"policy": "h2o", "budget": 6, "early_exit": True}),
    ("adore kv_bits=8 early_exit", {"policy": "adore", "budget": 6, "kv_bits": 8, "early_exit": 0.05}),
]
BATCHES = ((1, False), (3, True))  # (batch, left padding)
PROMPT = 12


def run_all(out_path: str, models: list[str], steps: int, compiler: str) -> None:
    """Run every variant in this process (kvpass from ``sys.path``) and save {key: logits, tokens or error}."""
    import torch
    from transformers import DynamicCache

    import kvpass

    sys.path.insert(0, str(ZOO_DIR))
    import zoo

    results = {}
    for model_name in models:
        for batch, left_padding in BATCHES:
            for name, options in VARIANTS:
                key = f"{model_name} | B={batch}{' padded' if left_padding else ''} | {name}"
                torch._dynamo.reset()
                kvpass.reset()
                try:
                    model = zoo.build(model_name)
                    model.forward = torch.compile(model.forward, backend="kvpass",
                                                  options={"compiler": compiler, **options})
                    ids, mask = zoo.prompt(batch, length=PROMPT, left_padding=left_padding)
                    logits, tokens = [], []
                    with torch.no_grad():
                        out = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True)
                        for _ in range(steps):
                            last = out.logits[:, -1]
                            logits.append(last.float().cpu())
                            token = last.argmax(-1, keepdim=True)
                            tokens.append(token.cpu())
                            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                            out = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values,
                                        use_cache=True)
                        logits.append(out.logits[:, -1].float().cpu())
                    results[key] = {"logits": torch.stack(logits, 1), "tokens": torch.cat(tokens, 1)}
                except Exception as e:  # recorded: the other revision must fail the same way
                    results[key] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
                    traceback.print_exc(limit=2)
                print(key, "error" if "error" in results[key] else "ok", flush=True)
    torch.save(results, out_path)


def compare(a_path: str, b_path: str, a_name: str = "base", b_name: str = "head") -> int:
    import torch

    a, b = torch.load(a_path), torch.load(b_path)
    rows, bad = [], 0
    for key in sorted(set(a) | set(b), key=lambda k: (k.split(" | ")[0], k.split(" | ")[1], k)):
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            status = f"missing in {a_name if x is None else b_name}"
        elif "error" in x or "error" in y:
            status = "same error" if x.get("error") == y.get("error") else f"error: {x.get('error') or y.get('error')}"
        elif torch.equal(x["logits"], y["logits"]) and torch.equal(x["tokens"], y["tokens"]):
            status = "identical"
        else:
            diff = (x["logits"] - y["logits"]).abs().max().item() if x["logits"].shape == y["logits"].shape else "shape"
            status = f"DIFFERENT (max |logit diff| {diff}, tokens equal: {torch.equal(x['tokens'], y['tokens'])})"
        bad += status not in ("identical",)
        rows.append((key, status))
    width = max(len(k) for k, _ in rows)
    for key, status in rows:
        print(f"{key:<{width}}  {status}")
    print(f"\n{len(rows) - bad} of {len(rows)} runs bit-identical ({a_name} vs {b_name}); {bad} not")
    return 1 if bad else 0


def _run_revision(rev: str, out: str, args, tmp: Path) -> None:
    """``--run`` in a subprocess over a git worktree of ``rev`` (or this checkout for ".")."""
    tree = REPO if rev == "." else tmp / f"tree_{rev}"
    if rev != ".":
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                       stdout=subprocess.DEVNULL)
    try:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run", out, "--tree", str(tree),
                        "--models", ",".join(args.models), "--steps", str(args.steps), "--compiler", args.compiler],
                       check=True, cwd=tree, env=env)
    finally:
        if rev != ".":
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("revisions", nargs="*", help="BASE [HEAD] git revisions (HEAD by default; '.' = this checkout)")
    ap.add_argument("--run", metavar="OUT", help="run the variants of --tree (default: this checkout) into OUT")
    ap.add_argument("--tree", default=str(REPO), help="with --run: the checkout whose kvpass is imported")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two saved runs")
    ap.add_argument("--models", type=lambda s: s.split(","), default=["llama", "gpt2"])
    ap.add_argument("--steps", type=int, default=8, help="decode steps after the prefill")
    ap.add_argument("--compiler", default="eager", choices=["eager", "inductor"])
    args = ap.parse_args()
    if args.run:
        sys.path.insert(0, str(Path(args.tree).resolve()))
        run_all(args.run, args.models, args.steps, args.compiler)
        return 0
    if args.compare:
        return compare(*args.compare)
    if not 1 <= len(args.revisions) <= 2:
        ap.error("give BASE [HEAD], or --run, or --compare")
    base, head = (args.revisions + ["HEAD"])[:2]
    with tempfile.TemporaryDirectory(prefix="kvpass_bit_identity_") as tmp:
        tmp = Path(tmp)
        outs = {}
        for rev in (base, head):
            outs[rev] = str(tmp / f"{rev.replace('/', '_')}.pt")
            print(f"== {rev}", flush=True)
            _run_revision(rev, outs[rev], args, tmp)
        return compare(outs[base], outs[head], base, head)


if __name__ == "__main__":
    sys.exit(main())
