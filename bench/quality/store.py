"""The results file: load it, check a new run can join it, merge a run's configurations in, write it.

A run of some configurations (``eval_quality.py --only 'kvpass/kv_bits*'``) replaces exactly those
configurations' rows (config row, groups, outputs, perplexity) and keeps every other one, so each
variant's issue reruns only its own rows. Rows can only be merged when they were measured on the
same prompts and texts: ``settings`` are the run parameters that decide them, and the prompt list
itself is compared too (a change to a task generator changes the prompts under the same settings).
Configurations no longer listed in ``configs.py`` are dropped; rows are kept in its order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Run parameters that decide the prompts, the perplexity texts and so what every number means.
SETTINGS = ("model", "tasks", "lengths", "n_per_task_length", "seed", "ppl_texts", "ppl_text_tokens", "ppl_prefix")


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def settings_diff(meta: dict, settings: dict) -> list[str]:
    """The settings on which a stored run's ``meta`` and a new run differ ("key: old -> new")."""
    return [f"{k}: {meta.get(k)!r} -> {settings[k]!r}" for k in SETTINGS if meta.get(k) != settings[k]]


def merge(base: dict | None, run: dict, order: list[str]) -> dict:
    """``base`` with ``run``'s configurations replacing its own; rows in ``order`` (config names)."""
    run = json.loads(json.dumps(run))  # as stored (tuples become lists), so prompts compare equal
    if base is None:
        base = {"meta": {**run["meta"], "runs": []}, "configs": [], "prompts": run["prompts"], "groups": [],
                "outputs": {}, "perplexity": []}
    elif base["prompts"] != run["prompts"]:
        raise ValueError("the stored results were measured on other prompts: rerun every configuration")
    new = {c["name"] for c in run["configs"]}
    keep = lambda name: name not in new and name in order  # noqa: E731
    rank = {name: i for i, name in enumerate(order)}
    by_rank = lambda row: rank[row["config"]]  # noqa: E731
    runs = [r for r in base["meta"].get("runs", []) if any(keep(n) for n in r["configs"])]
    runs.append({k: run["meta"][k] for k in ("date", "argv", "wall_s") if k in run["meta"]} | {"configs": sorted(new)})
    return {
        "meta": {**run["meta"], "runs": runs},
        "configs": sorted([c for c in base["configs"] if keep(c["name"])] + run["configs"],
                          key=lambda c: rank[c["name"]]),
        "prompts": run["prompts"],
        "groups": sorted([g for g in base["groups"] if keep(g["config"])] + run["groups"], key=by_rank),
        "outputs": {**{k: v for k, v in base["outputs"].items() if keep(k)}, **run["outputs"]},
        "perplexity": sorted([p for p in base["perplexity"] if keep(p["config"])] + run["perplexity"], key=by_rank),
    }


def subset(results: dict, names: set[str]) -> dict:
    """The rows of ``results`` for configurations ``names``, shaped as one run for :func:`merge` (rows
    measured by parallel runs into separate files join the main file this way)."""
    return {
        "meta": results["meta"],
        "configs": [c for c in results["configs"] if c["name"] in names],
        "prompts": results["prompts"],
        "groups": [g for g in results["groups"] if g["config"] in names],
        "outputs": {k: v for k, v in results["outputs"].items() if k in names},
        "perplexity": [p for p in results["perplexity"] if p["config"] in names],
    }


def write(results: dict, path: Path) -> None:
    """Write atomically: a run killed mid-write never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
