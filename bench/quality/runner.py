"""Run the selected configurations over the same prompts and texts, and collect every number in one dict.

Main environment: eager (``model.forward``) and kvpass (``torch.compile(model.forward,
backend="kvpass", options=...)``). kvpass rows compile with ``compiler="eager"`` by default: the
rewritten graph with the same kvpass ops, run without Inductor. On this CPU the variant's numbers
are what is measured here, and with Inductor the exact row took 2245 s against eager's 575 s in the
first recorded run (compiling the 30-layer graphs, and Inductor's CPU code); ``--kvpass-compiler
inductor`` restores it. Each kvpass option dict is first checked with ``kvpass.validate_options``: a
configuration the backend does not implement yet raises there at once, instead of after tracing the
30-layer model, and becomes a "not implemented" row. The kvpress peer runs in its own environment
(``kvpress_peer.py``) on the same token ids; its outputs are scored here.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import configs as configs_mod
from . import tasks as tasks_mod
from .configs import Config
from .decode import cache_bytes, greedy
from .perplexity import make_texts, perplexity

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


def classify_failure(exc: BaseException) -> tuple[str, str]:
    """(status, message) of a compile/run failure; Dynamo wraps backend errors, so walk the chain."""
    seen, chain, cur = set(), [], exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = getattr(cur, "inner_exception", None) or cur.__cause__ or cur.__context__
    for e in chain:
        if isinstance(e, NotImplementedError):
            return "not implemented", f"{e}".strip()[:300]
    for e in chain:
        if isinstance(e, (ValueError, TypeError)):
            return "invalid options", f"{type(e).__name__}: {e}".strip()[:300]
    root = chain[-1]
    return "error", f"{type(root).__name__}: {root}".strip()[:300]


def make_forward(model, config: Config, length: int, compiler: str | None):
    if config.engine == "eager":
        return model.forward
    import kvpass  # noqa: F401  (registers the backend)

    torch._dynamo.reset()
    return torch.compile(model.forward, backend="kvpass", options=config.options_for(length, compiler))


def kvpass_report() -> dict:
    """What the backend rewrote (its report and counters) for the configuration just run."""
    try:
        import kvpass

        report = kvpass.report()
        return {"report": str(report), "counters": dict(kvpass.counters), "stats": kvpass.stats()}
    except Exception as e:  # extra information: never fail a run over it
        return {"error": f"{type(e).__name__}: {e}"}


def probe(config: Config, length: int, compiler: str | None) -> tuple[str, str]:
    """("ok", "") if the backend accepts ``config``'s options, else the failure's (status, message)."""
    if config.engine == "eager":
        return "ok", ""
    try:
        import kvpass

        kvpass.validate_options(config.options_for(length, compiler))
    except Exception as e:
        return classify_failure(e)
    return "ok", ""


def run_config(model, tokenizer, config: Config, prompts, ppl: dict, batch_size: int, compiler: str | None) -> dict:
    """One configuration over every prompt (grouped by task and length) and the perplexity texts."""
    outputs, groups, forwards = {}, [], {}
    by_key: dict[tuple, list] = {}
    for p in prompts:
        by_key.setdefault((p.task, p.length), []).append(p)
    for (task, length), group in by_key.items():
        # A budget is in tokens, so a budgeted configuration compiles once per length.
        key = length if config.budget is not None else None
        if key not in forwards:
            forwards[key] = make_forward(model, config, length, compiler)
        forward = forwards[key]
        t0, prefill_s, nbytes = time.perf_counter(), 0.0, 0.0
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            ids = torch.tensor([p.input_ids for p in batch])
            rows, cache, pf, _ = greedy(forward, model, tokenizer, ids, batch[0].max_new_tokens)
            prefill_s += pf
            nbytes += cache_bytes(cache)
            for p, row in zip(batch, rows):
                outputs[prompt_id(p)] = row
        groups.append(
            {
                "task": task, "length": length, "n": len(group), "wall_s": time.perf_counter() - t0,
                "prefill_tok_s": len(group) * length / prefill_s, "cache_bytes": nbytes / len(group),
            }
        )
        log.info("%s %s L=%d: %.0f s", config.name, task, length, groups[-1]["wall_s"])
    ppl_row = None
    if ppl["texts"]:
        t0 = time.perf_counter()
        forward = forwards.get(None) or make_forward(model, config, ppl["prefix"], compiler)
        ppl_row = perplexity(forward, model, ppl["texts"], ppl["prefix"], batch_size)
        ppl_row["wall_s"] = time.perf_counter() - t0
        log.info("%s perplexity %.3f (%.0f s)", config.name, ppl_row["ppl"], ppl_row["wall_s"])
    return {"outputs": outputs, "groups": groups, "perplexity": ppl_row}


def prompt_id(p) -> str:
    return f"{p.task}/{p.length}/{p.index}"


def run_kvpress(python: str, model_path: Path, configs: list[Config], prompts, ppl: dict, batch_size: int) -> dict:
    """The peer in its own interpreter; returns its JSON (outputs per configuration and prompt)."""
    spec = {
        "model_path": str(model_path),
        "configs": [c.to_json() for c in configs],
        "prompts": [{"id": prompt_id(p), **p.to_json()} for p in prompts],
        "batch_size": batch_size,
        "ppl_texts": ppl["texts"],
        "ppl_prefix": ppl["prefix"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "in.json"), Path(tmp, "out.json")
        src.write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
        cmd = [python, "-m", "bench.quality.kvpress_peer", str(src), str(dst)]
        # stderr (the peer's progress log) passes through to ours; stdout is unused.
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=None)
        if proc.returncode != 0:
            raise RuntimeError(f"kvpress peer failed with exit code {proc.returncode} (its log is above)")
        return json.loads(dst.read_text())


def evaluate(
    model, tokenizer, *, model_name: str, model_path: Path | None, task_names, lengths, n: int, seed: int,
    batch_size: int, ppl_texts: int, ppl_prefix: int, ppl_length: int, configs: list[Config],
    kvpass_compiler: str | None = "eager", kvpress_python: str | None = None, on_update=None,
) -> dict:
    """Run ``configs`` over the same prompts; returns the results dict (``store.py`` merges it,
    ``report.py`` renders it). ``on_update(results)`` is called after each configuration."""
    t_start = time.perf_counter()
    prompts = [p for t in task_names for L in lengths for p in tasks_mod.make_prompts(t, tokenizer, L, n, seed)]
    ppl = {"texts": make_texts(tokenizer, ppl_texts, ppl_length, seed) if ppl_texts else [], "prefix": ppl_prefix}
    results = {
        "meta": _meta(model_name, model_path, model, task_names, lengths, n, seed, batch_size, ppl, kvpass_compiler),
        "configs": [],
        "prompts": [{"id": prompt_id(p), "task": p.task, "length": p.length, "answers": p.answers} for p in prompts],
        "groups": [],
        "outputs": {},
        "perplexity": [],
    }

    def record(config: Config, status: str, message: str = "", extra: dict | None = None) -> None:
        row = {**config.to_json(), "status": status, "message": message, "date": _now(), **(extra or {})}
        results["configs"].append(row)
        if on_update:
            on_update(results)

    for config in [c for c in configs if c.engine != "kvpress"]:
        status, message = probe(config, min(lengths), kvpass_compiler)
        if status != "ok":
            log.info("%s: %s (%s)", config.name, status, message[:120])
            record(config, status, message)
            continue
        try:
            t0 = time.perf_counter()
            if config.engine == "kvpass":
                import kvpass

                kvpass.reset()
            out = run_config(model, tokenizer, config, prompts, ppl, batch_size, kvpass_compiler)
        except Exception as e:
            record(config, *classify_failure(e))
            log.exception("%s failed", config.name)
            continue
        _merge(results, config.name, tokenizer, prompts, out)
        extra = {"wall_s": time.perf_counter() - t0, "versions": results["meta"]["versions"]}
        if config.engine == "kvpass":
            extra["kvpass_report"] = kvpass_report()
            extra["compiler"] = kvpass_compiler
        record(config, "ok", "", extra)
        log.info("%s done in %.1f min", config.name, extra["wall_s"] / 60)

    peer_configs = [c for c in configs if c.engine == "kvpress"]
    if peer_configs:
        _run_peer(results, record, peer_configs, kvpress_python, model_path, tokenizer, prompts, ppl, batch_size)
    results["meta"]["wall_s"] = time.perf_counter() - t_start
    return results


def _run_peer(results, record, configs, kvpress_python, model_path, tokenizer, prompts, ppl, batch_size) -> None:
    if kvpress_python is None:
        for c in configs:
            record(c, "unavailable", "no kvpress environment: run bench/quality/setup_kvpress_env.sh")
        return
    if model_path is None:
        for c in configs:
            record(c, "unavailable", "the peer needs a model folder on disk")
        return
    t0 = time.perf_counter()
    try:
        peer = run_kvpress(kvpress_python, model_path, configs, prompts, ppl, batch_size)
    except Exception as e:
        log.exception("kvpress peer failed")
        for c in configs:
            record(c, *classify_failure(e))
        return
    _merge_peer(results, tokenizer, prompts, peer)
    wall = time.perf_counter() - t0
    for c in configs:
        extra = {"versions": peer["versions"], "peer_wall_s": wall}
        if c.name in peer["same_cache_as"]:
            extra["same_cache_as"] = peer["same_cache_as"][c.name]
        record(c, "ok", "", extra)
    log.info("kvpress peer (%d configurations) done in %.1f min", len(configs), wall / 60)


def _merge(results: dict, name: str, tokenizer, prompts, out: dict) -> None:
    by_id = {prompt_id(p): p for p in prompts}
    texts = {pid: tokenizer.decode(ids, skip_special_tokens=True) for pid, ids in out["outputs"].items()}
    results["outputs"][name] = texts
    for g in out["groups"]:
        ids = [pid for pid, p in by_id.items() if (p.task, p.length) == (g["task"], g["length"])]
        scores = [tasks_mod.score(g["task"], by_id[pid].answers, texts[pid]) for pid in ids]
        results["groups"].append({"config": name, **g, "accuracy": sum(scores) / len(scores), "scores": scores})
    if out["perplexity"]:
        results["perplexity"].append({"config": name, **out["perplexity"]})


def _merge_peer(results: dict, tokenizer, prompts, peer: dict) -> None:
    rows: dict[str, dict] = {}
    for r in peer["results"]:
        rows.setdefault(r["config"], {})[r["prompt"]] = r
    for name, by_prompt in rows.items():
        groups = {}
        for p in prompts:
            r = by_prompt[prompt_id(p)]
            g = groups.setdefault((p.task, p.length), {"n": 0, "bytes": 0.0, "prefill": 0.0, "decode": 0.0, "ctx": []})
            g["n"] += 1
            g["bytes"] += r["cache_bytes"]
            g["prefill"] += r["prefill_s"]
            g["decode"] += r["decode_s"]
            g["ctx"].append(r["context_tokens"])
        out = {
            "outputs": {pid: r["output_ids"] for pid, r in by_prompt.items()},
            "groups": [
                {
                    # One shared prefill serves every peer configuration (kvpress_peer.py): its
                    # share is counted in each row's wall_s, its speed in none of them.
                    "task": t, "length": L, "n": g["n"], "wall_s": g["prefill"] + g["decode"], "decode_s": g["decode"],
                    "prefill_tok_s": None, "cache_bytes": g["bytes"] / g["n"],
                    "context_tokens": sum(g["ctx"]) / len(g["ctx"]),
                }
                for (t, L), g in groups.items()
            ],
            "perplexity": None,
        }
        _merge(results, name, tokenizer, prompts, out)
    for p in peer.get("perplexity", []):
        results["perplexity"].append({"config": p["config"], **p, "ppl": _exp_mean(p["nll_sum"], p["tokens"])})


def _exp_mean(nll_sum: float, tokens: int) -> float:
    import math

    return math.exp(nll_sum / tokens)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _meta(model_name, model_path, model, task_names, lengths, n, seed, batch_size, ppl, kvpass_compiler) -> dict:
    import transformers

    return {
        "date": _now(),
        "model": model_name,
        "model_path": str(model_path) if model_path else None,
        "model_params": sum(p.numel() for p in model.parameters()),
        "tasks": list(task_names),
        "lengths": list(lengths),
        "n_per_task_length": n,
        "seed": seed,
        "batch_size": batch_size,
        "ppl_texts": len(ppl["texts"]),
        "ppl_text_tokens": len(ppl["texts"][0]) if ppl["texts"] else 0,
        "ppl_prefix": ppl["prefix"],
        "budgets": list(configs_mod.BUDGETS),
        "kvpass_compiler": kvpass_compiler,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "argv": sys.argv,
    }
