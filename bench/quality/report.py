"""Render a results dict (runner.evaluate): JSON, a markdown section of bench/RESULTS.md, PNG plots.

The markdown goes between ``<!-- quality:begin -->`` and ``<!-- quality:end -->`` of RESULTS.md;
the rest of the file belongs to other sections and is left byte for byte as it was.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"

# Keys a results dict must have, and the keys of each row: tests check the JSON against these.
SCHEMA = {
    "meta": ("date", "model", "tasks", "lengths", "n_per_task_length", "seed", "versions", "wall_s"),
    "configs": ("name", "engine", "options", "press", "budget", "status", "message"),
    "groups": ("config", "task", "length", "n", "accuracy", "scores", "cache_bytes", "wall_s"),
    "perplexity": ("config", "ppl", "nll_sum", "tokens"),
    "prompts": ("id", "task", "length", "answers"),
}


def check_schema(results: dict) -> None:
    """Raise ValueError naming the first missing key."""
    for section, keys in SCHEMA.items():
        if section not in results:
            raise ValueError(f"results lack {section!r}")
        rows = [results[section]] if isinstance(results[section], dict) else results[section]
        for row in rows:
            missing = [k for k in keys if k not in row]
            if missing:
                raise ValueError(f"{section} row lacks {missing}: {str(row)[:200]}")


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


def _method(name: str) -> str:
    return re.sub(r"@1/\d+", "", name)


def _budget_label(budget: float | None) -> str:
    return "full" if budget is None else f"1/{round(1 / budget)}"


def _only_patterns(argv: list[str]) -> list[str]:
    """The patterns a run's ``--only`` took (up to the next option)."""
    if "--only" not in argv:
        return []
    patterns = []
    for a in argv[argv.index("--only") + 1:]:
        if a.startswith("-"):
            break
        patterns.append(a)
    return patterns


def _runs_line(meta: dict) -> str:
    runs = meta.get("runs") or [{"date": meta["date"], "wall_s": meta.get("wall_s", 0), "argv": [], "configs": []}]
    parts = []
    for r in runs:
        only = _only_patterns(r.get("argv", []))
        what = f"`--only {' '.join(only)}`" if only else "every configuration"
        parts.append(f"{r['date'][:16].replace('T', ' ')} UTC ({what}, {len(r['configs'])} rows, "
                     f"{r.get('wall_s', 0) / 60:.0f} min)")
    return "; ".join(parts)


def _peer_versions(results: dict) -> str:
    for c in results["configs"]:
        if c["engine"] == "kvpress" and c.get("versions"):
            v = c["versions"]
            return (f" (kvpress rows: kvpress {v.get('kvpress')}, transformers {v.get('transformers')}, "
                    f"torch {v.get('torch')})")
    return ""


def markdown(results: dict, json_rel: str, plot_rel: str) -> str:
    meta = results["meta"]
    tasks, lengths = meta["tasks"], meta["lengths"]
    acc = {(g["config"], g["task"], g["length"]): g for g in results["groups"]}
    ok = [c for c in results["configs"] if c["status"] == "ok"]
    other = [c for c in results["configs"] if c["status"] != "ok"]
    cols = [(t, L) for L in lengths for t in tasks]
    v = meta["versions"]
    budgets = ", ".join(f"{_budget_label(b)}: {round(b * lengths[0])}" for b in meta.get("budgets", []))
    lines = [
        BEGIN,
        "## Quality on SmolLM2-135M",
        "",
        f"`python bench/quality/eval_quality.py`: model `{meta['model']}` "
        f"({meta.get('model_params', 0) / 1e6:.1f}M parameters, float32, CPU: {meta.get('machine', '?')}); "
        f"Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}{_peer_versions(results)}; "
        f"{meta['n_per_task_length']} prompts per task and length, seed {meta['seed']}; kvpass rows compiled "
        f"with `compiler=\"{meta.get('kvpass_compiler') or 'inductor'}\"`. Runs: {_runs_line(meta)}. "
        f"Every number: [`{json_rel}`]({json_rel}); plots: `{plot_rel}`.",
        "",
        "Tasks (bench/quality/tasks.py, completion style): passkey, multikey (3 distractor keys), multivalue "
        "(recall of 3 values), vartrack (recall of a 3-variable chain), docqa (next 4 words after a quoted "
        f"opening). Budget: the fraction of the prompt kept per layer and KV head ({budgets} tokens at "
        f"{lengths[0]}). kvpress, two protocols on the same token ids: `kvpress/` compresses the whole prompt "
        "at prefill, question included (query-aware, as kvpass's policies do); `kvpress-ctx/` is its own "
        "pipeline's: the context is compressed (budget: a fraction of the context), the question is then read "
        "uncompressed. SnapKV and PyramidKV use an 8-token observation window: kvpress's default 64 is the "
        "whole budget at 1/8 and 1/16 of 512, so SnapKV kept only recent tokens (perplexity at 1/8: 38.5 "
        "with window 64, 18.4 with 8; bench/quality/configs.py).",
        "",
        "### Accuracy (%) per task and context length",
        "",
        "| method | budget | " + " | ".join(f"{t} @{L}" for t, L in cols) + " | mean | KV cache / prompt | run min |",
        "|---|---|" + "---|" * len(cols) + "---|---|---|",
    ]
    twins = []
    for c in ok:
        cells, vals, nbytes = [], [], []
        for t, L in cols:
            g = acc.get((c["name"], t, L))
            cells.append(f"{100 * g['accuracy']:.0f}" if g else "-")
            if g:
                vals.append(g["accuracy"])
                nbytes.append(g["cache_bytes"])
        mean = f"{100 * sum(vals) / len(vals):.1f}" if vals else "-"
        kb = f"{sum(nbytes) / len(nbytes) / 2**20:.1f} MiB" if nbytes else "-"
        cost = f"{c['wall_s'] / 60:.1f}" if c.get("wall_s") else ("shared" if c["engine"] == "kvpress" else "-")
        lines.append(
            f"| {_method(c['name'])} | {_budget_label(c['budget'])} | "
            + " | ".join(cells) + f" | {mean} | {kb} | {cost} |"
        )
        if c.get("same_cache_as"):
            twins.append(f"{c['name']} = {c['same_cache_as']}")
    peer_wall = next((c["peer_wall_s"] for c in ok if c.get("peer_wall_s")), None)
    if peer_wall:
        lines += ["", f"The kvpress rows share one prefill per prompt and took {peer_wall / 60:.0f} min together."]
    if twins:
        lines += [
            "",
            "Bitwise identical caches on every prompt (decoded once; PyramidKV falls back to SnapKV while its "
            "smallest layer budget, budget / 20, is under the window): " + "; ".join(twins) + ".",
        ]

    lines += _exact_agreement(results)
    lines += ["", "### Perplexity through the cache", ""]
    ppl = {p["config"]: p for p in results["perplexity"]}
    if ppl:
        base = ppl.get("eager/full")
        lines += [
            f"{meta.get('ppl_texts', '?')} texts of {meta.get('ppl_text_tokens', '?')} tokens; the first "
            f"{meta.get('ppl_prefix', '?')} prefilled (and, for a budget, compressed), every later token "
            "scored as it is fed through the cache (kvpress: as one chunk, which equals token-by-token since "
            "its presses act at prefill only; the texts have no question, so its two protocols coincide).",
            "",
            "| method | budget | perplexity | vs eager |",
            "|---|---|---|---|",
        ]
        for c in ok:
            p = ppl.get(c["name"])
            if p:
                rel = f"{100 * (p['ppl'] / base['ppl'] - 1):+.2f}%" if base else "-"
                lines.append(f"| {_method(c['name'])} | {_budget_label(c['budget'])} | {p['ppl']:.3f} | {rel} |")
    if other:
        lines += [
            "",
            "### Not run",
            "",
            "As each variant lands, its issue reruns its rows, e.g. `python bench/quality/eval_quality.py --only "
            "'kvpass/kv_bits*'` (about one prefill pass, 5-10 min, per row here).",
            "",
            "| config | options | status | message |",
            "|---|---|---|---|",
        ]
        for c in other:
            msg = c["message"].replace("|", "/").replace("\n", " ")[:140]
            opts = json.dumps(c["options"]) if c["options"] is not None else "-"
            lines.append(f"| {c['name']} | `{opts}` | {c['status']} | {msg} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def _exact_agreement(results: dict) -> list[str]:
    outs = results["outputs"]
    if "eager/full" not in outs:
        return []
    lines = ["", "Exact configurations against eager (identical generated text, all prompts):", ""]
    for name in ("kvpass/exact", "kvpress/none"):
        if name in outs:
            same = sum(outs[name].get(pid) == text for pid, text in outs["eager/full"].items())
            lines.append(f"- {name}: {same}/{len(outs['eager/full'])}")
    return lines


def update_results_md(path: Path, section: str) -> None:
    """Replace the quality section of ``path`` (or append it; create the file if absent)."""
    text = path.read_text() if path.exists() else "# kvpass results\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


# kvpass solid, the peer's query-aware rows dashed, its own protocol dotted.
_STYLE = {
    "kvpass": {"marker": "o"},
    "kvpress": {"marker": "s", "ls": "--"},
    "kvpress-ctx": {"marker": "^", "ls": ":"},
}


def plots(results: dict, out_dir: Path) -> list[Path]:
    """One PNG per task: accuracy against budget, a line per method, a panel per context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["meta"]
    budget_of = {c["name"]: c["budget"] for c in results["configs"]}
    acc = {(g["config"], g["task"], g["length"]): g["accuracy"] for g in results["groups"]}
    # Budgeted methods get their full-cache point from their engine's exact configuration.
    full_of = {"kvpass": "kvpass/exact", "kvpress": "kvpress/none", "kvpress-ctx": "kvpress/none"}
    written = []
    for task in meta["tasks"]:
        fig, axes = plt.subplots(1, len(meta["lengths"]), figsize=(5 * len(meta["lengths"]) + 2.5, 4.5), squeeze=False)
        for ax, L in zip(axes[0], meta["lengths"]):
            series = defaultdict(list)
            for name, budget in budget_of.items():
                if budget is not None and (name, task, L) in acc:
                    series[_method(name)].append((budget, acc[(name, task, L)]))
            for method, points in sorted(series.items()):
                full = acc.get((full_of.get(method.split("/")[0]), task, L))
                if full is not None:
                    points.append((1.0, full))
                points.sort()
                engine = method.split("/")[0]
                ax.plot([b for b, _ in points], [100 * a for _, a in points], label=method, **_STYLE.get(engine, {}))
            if ("eager/full", task, L) in acc:
                ax.axhline(100 * acc[("eager/full", task, L)], color="black", ls="--", label="eager, full cache")
            ax.set_xscale("log", base=2)
            ax.set_xticks([1 / 16, 1 / 8, 1 / 4, 1], ["1/16", "1/8", "1/4", "full"])
            ax.set_ylim(-3, 103)
            ax.set_xlabel("KV budget (fraction of the prompt kept; kvpress-ctx: of the context)")
            ax.set_ylabel("accuracy (%)")
            ax.set_title(f"{task}, {L} tokens, n={meta['n_per_task_length']}")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(f"{meta['model']}: {task}")
        fig.tight_layout()
        path = out_dir / f"quality_{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
