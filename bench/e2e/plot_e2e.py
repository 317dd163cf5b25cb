"""Plots of end-to-end decode runs (``bench/e2e/e2e_decode.py`` or ``fixed_capacity.py`` JSON, or their bench.run
records): tokens/s and memory vs context length.

    python bench/e2e/plot_e2e.py bench/results/e2e_decode/h200/2026-12-01_1b-matrix-2-warmups.json [more.json ...] \
        --out bench/results/e2e_decode/h200

Writes ``e2e_tokens_per_s.png`` (``--prefix``) (tokens/s vs context, one panel per shape and batch, one line per method)
and ``e2e_memory.png`` (KV-cache GiB, solid, and peak GiB, dashed, vs context, same panels). Rows of the
largest-batch probe and rows that failed are left out; each JSON's GPU is named in the panel title, and
runs on different GPUs are kept in different panels (their timings do not compare).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.paths import RESULTS_DIR  # noqa: E402


def load_rows(paths: list[str]) -> list[dict]:
    """The timed rows of e2e_decode.py or fixed_capacity.py JSONs, or of bench.run records holding them
    (``result``); fixed_capacity's rows get e2e_decode's fields (tokens/s, KV and peak GiB)."""
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        data = data.get("result", data)
        environment = data.get("environment", {})
        gpu = environment.get("gpu") or environment.get("device_name", "?")
        for row in data["rows"]:
            if row.get("fit_probe") or row.get("error") or "ms_per_token" not in row:
                continue
            row = {**row, "gpu": gpu}
            row.setdefault("tokens_per_s", row["batch"] * 1e3 / row["ms_per_token"])
            if "kv_bytes" in row:
                row.setdefault("kv_GiB", row["kv_bytes"] / 2**30)
            if "peak_gb" in row:
                row.setdefault("peak_GiB", row["peak_gb"])
            rows.append(row)
    return rows


def panels(rows: list[dict]) -> dict[tuple, dict[str, list[dict]]]:
    """(gpu, shape, batch) -> method -> rows sorted by context."""
    out: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        out[(row["gpu"], row["shape"], row["batch"])][row["method"]].append(row)
    for methods in out.values():
        for series in methods.values():
            series.sort(key=lambda r: r["context"])
    return out


def plot(rows: list[dict], out_dir: Path, note: str = "", prefix: str = "e2e") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = panels(rows)
    # one colour per method across panels, so a method reads the same in every panel
    colours = {m: f"C{i}" for i, m in enumerate(sorted({r["method"] for r in rows}))}
    keys = sorted(groups, key=lambda k: (k[0], k[1], k[2]))
    written = []
    for name, ylabel, series_of in (
        (f"{prefix}_tokens_per_s.png", "tokens / s", lambda r: [("", r["tokens_per_s"], "-")]),
        (f"{prefix}_memory.png", "GiB (KV solid, peak dashed)",
         lambda r: [("KV", r["kv_GiB"], "-"), ("peak", r.get("peak_GiB"), "--")]),
    ):
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for method, series in sorted(groups[key].items()):
                contexts = [r["context"] for r in series]
                parts = [series_of(r) for r in series]
                for i, (label, _, style) in enumerate(parts[0]):
                    values = [p[i][1] for p in parts]
                    if any(v is None for v in values):
                        continue
                    ax.plot(contexts, values, style, marker="o", color=colours[method],
                            label=f"{method} {label}".strip())
            gpu, shape, batch = key
            ax.set_title(f"{shape}, batch {batch}\n{gpu}", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context tokens")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        if note:  # what the reader must know about the run (e.g. a timing caveat)
            fig.suptitle(note, fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", default=str(RESULTS_DIR / "e2e_decode"))
    ap.add_argument("--note", default="", help="a line printed above the panels")
    ap.add_argument("--prefix", default="e2e", help="file names: PREFIX_tokens_per_s.png, PREFIX_memory.png")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in plot(load_rows(args.json), out, args.note, args.prefix):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
