"""Quality of every kvpass configuration and of the kvpress peer on SmolLM2-135M: the one command.

    python bench/quality/eval_quality.py                            # every configuration (the recorded run)
    python bench/quality/eval_quality.py --only 'kvpass/kv_bits*'   # rerun those, merge into the results
    python bench/quality/eval_quality.py --only 'kvpress*'          # the peer only (both protocols)
    python bench/quality/eval_quality.py --report-only              # re-render RESULTS.md and plots from the JSON
    python bench/quality/eval_quality.py --merge-from /tmp/q/quality.json --only 'kvpass/adore*'  # a parallel run
    python bench/quality/eval_quality.py --n 4 --no-kvpress --out /tmp/q --results-md /tmp/q/R.md   # a quick look

Writes bench/results/quality/cpu/quality.json (after every configuration, so a killed run keeps what finished),
bench/results/quality/cpu/quality_<task>.png and the "Quality on SmolLM2-135M" section of bench/RESULTS.md.
``--only`` takes glob patterns over configuration names (bench/quality/configs.py) and replaces just
those rows of the stored results, which must have been measured with the same settings (model,
tasks, lengths, prompts per task, seed, perplexity texts); without ``--only`` every configuration
runs. kvpress runs if its environment exists (``bash bench/quality/setup_kvpress_env.sh`` builds it).
``--model`` takes "smollm2", "tiny" (a random 2-layer Llama, for smoke tests) or a local Hugging
Face model folder.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Set before torch starts OpenMP. The 2 cores are shared with other jobs, and OpenMP's spinning
# threads then stall each other: with 3 other jobs running, a batch-10 decode step of eager SmolLM2
# took 8.3 s with the default policy and 0.5 s with PASSIVE (prefill of 10 x 512: 59 s -> 34 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.paths import RESULTS_DIR, RESULTS_MD  # noqa: E402
from bench.quality import configs, report, runner, store, tasks  # noqa: E402
from kvpass.models import default_cache_dir, default_model_path, load_model, save_tiny_llama  # noqa: E402

log = logging.getLogger("eval_quality")

# Sizing, measured on the 2 shared CPU cores (AMD EPYC, AVX2; 2026-11-23). A configuration's cost is
# mostly its prefills: 5 tasks x 50 prompts x 512 tokens = 128k tokens at 212 MFLOP per token, and
# fp32 GEMMs here peak at 107 GFLOP/s, so >= 4.2 min of prefill per configuration whatever the
# settings; eager prefills 415 tok/s (5.1 min) on idle cores and 150 tok/s (14 min) with three other
# test jobs on them. Answers (8-26 greedy steps) and perplexity (10 texts: a 512-token prefill and
# 256 teacher-forced steps at 0.15-0.6 s) add 2-5 min. So 26 configurations take 3-8 hours, not 60
# minutes: the full run is one command, and each variant's issue reruns its own rows with --only.
# Batch 25: a decode step reads the 540 MB of weights whatever the batch, so 25 rows per step cost
# ~1.7x what 10 do (the cache read grows) and the peer's compressed caches barely add to it.
# 1024 tokens would double every prefill for a model that is only partly reliable there: 512 only
# (--lengths 512 1024 runs both).
DEFAULTS = {"lengths": [512], "n": 50, "batch_size": 25, "ppl_texts": 10, "ppl_length": 768, "ppl_prefix": 512}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", nargs="+", default=list(tasks.TASKS), choices=list(tasks.TASKS))
    ap.add_argument("--lengths", nargs="+", type=int, default=DEFAULTS["lengths"])
    ap.add_argument("--n", type=int, default=DEFAULTS["n"], help="prompts per task and length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--ppl-texts", type=int, default=DEFAULTS["ppl_texts"])
    ap.add_argument("--ppl-length", type=int, default=DEFAULTS["ppl_length"], help="tokens per text")
    ap.add_argument("--ppl-prefix", type=int, default=DEFAULTS["ppl_prefix"], help="tokens prefilled, not scored")
    ap.add_argument("--only", nargs="+", metavar="GLOB", help="run only these configurations and merge them in")
    ap.add_argument("--no-kvpress", action="store_true", help="leave the kvpress rows as they are")
    ap.add_argument("--kvpass-compiler", default="eager", choices=["eager", "inductor"],
                    help="kvpass's `compiler` option for every kvpass row (see bench/quality/runner.py)")
    ap.add_argument("--kvpress-python", default=str(default_cache_dir() / "kvpress-venv" / "bin" / "python"))
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "quality" / "cpu")
    ap.add_argument("--results-md", type=Path, default=RESULTS_MD)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-plots", action="store_true", help="write the JSON and RESULTS.md only (no matplotlib)")
    ap.add_argument("--merge-from", type=Path, metavar="QUALITY_JSON",
                    help="merge --only's rows (default: all) of another results file with the same settings, render")
    return ap.parse_args(argv)


def render(results: dict, out: Path, results_md: Path, plots: bool = True) -> None:
    report.check_schema(results)
    store.write(results, out / "quality.json")
    if plots:
        report.plots(results, out)
    rel = lambda p: os.path.relpath(p, results_md.parent)  # noqa: E731
    section = report.markdown(results, rel(out / "quality.json"), rel(out / "quality_<task>.png"))
    report.update_results_md(results_md, section)


def select(args, stored: dict | None) -> list[configs.Config]:
    """The configurations this run measures: ``--only``'s matches (or all), minus the peer's when it
    cannot run and the stored results already hold its rows."""
    chosen = [c for c in configs.all_configs() if not args.only or any(fnmatch.fnmatch(c.name, g) for g in args.only)]
    if not chosen:
        names = "\n  ".join(c.name for c in configs.all_configs())
        raise SystemExit(f"--only {args.only} matches no configuration; the names are:\n  {names}")
    peer_missing = not Path(args.kvpress_python).exists()
    if peer_missing and not args.no_kvpress:
        log.warning("no kvpress environment at %s: run bench/quality/setup_kvpress_env.sh", args.kvpress_python)
    if args.no_kvpress or peer_missing:
        stored_ok = {c["name"] for c in (stored or {}).get("configs", []) if c["status"] == "ok"}
        # With --no-kvpress the stored peer rows stay; without an environment, rows never measured
        # say "unavailable" so the table shows why they are empty.
        chosen = [c for c in chosen if c.engine != "kvpress" or (not args.no_kvpress and c.name not in stored_ok)]
    return chosen


def merge_from(args, path: Path) -> dict:
    """``--merge-from``: another run's rows into ``path`` (same settings, same prompts), then render."""
    stored, other = store.load(path), store.load(args.merge_from)
    if stored is None or other is None:
        raise SystemExit(f"--merge-from needs both {path} and {args.merge_from}")
    diff = store.settings_diff(stored["meta"], {k: other["meta"].get(k) for k in store.SETTINGS})
    if diff:
        raise SystemExit(f"{args.merge_from} was measured with other settings: {'; '.join(diff)}")
    names = {c["name"] for c in other["configs"] if c["status"] == "ok"
             and (not args.only or any(fnmatch.fnmatch(c["name"], g) for g in args.only))}
    if not names:
        raise SystemExit(f"no measured configuration of {args.merge_from} matches {args.only}")
    log.info("merging %s from %s", ", ".join(sorted(names)), args.merge_from)
    results = store.merge(stored, store.subset(other, names), [c.name for c in configs.all_configs()])
    render(results, args.out, args.results_md, plots=not args.no_plots)
    return results


def main(argv=None) -> dict:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = args.out / "quality.json"
    if args.report_only:
        results = json.loads(path.read_text())
        render(results, args.out, args.results_md, plots=not args.no_plots)
        return results
    if args.merge_from:
        return merge_from(args, path)
    settings = {
        "model": args.model, "tasks": list(args.tasks), "lengths": list(args.lengths), "n_per_task_length": args.n,
        "seed": args.seed, "ppl_texts": args.ppl_texts, "ppl_text_tokens": args.ppl_length if args.ppl_texts else 0,
        "ppl_prefix": args.ppl_prefix,
    }
    stored = store.load(path)
    diff = store.settings_diff(stored["meta"], settings) if stored else []
    if diff:
        if args.only:
            raise SystemExit(f"--only merges into {path}, measured with other settings ({'; '.join(diff)}): "
                             "rerun every configuration (no --only) or use the stored settings")
        stored = None  # a full run with new settings starts a new file
    chosen = select(args, stored)
    if args.model == "tiny":
        model_path = save_tiny_llama(Path(tempfile.mkdtemp(prefix="kvpass-tiny-")))
    elif args.model == "smollm2":
        model_path = default_model_path()
    else:
        model_path = Path(args.model)
    model, tokenizer = load_model(model_path)
    order = [c.name for c in configs.all_configs()]
    kvpress_python = args.kvpress_python if Path(args.kvpress_python).exists() else None
    log.info("running %d configurations: %s", len(chosen), ", ".join(c.name for c in chosen))
    run = runner.evaluate(
        model, tokenizer, model_name=args.model, model_path=model_path, task_names=args.tasks,
        lengths=args.lengths, n=args.n, seed=args.seed, batch_size=args.batch_size,
        ppl_texts=args.ppl_texts, ppl_prefix=args.ppl_prefix, ppl_length=args.ppl_length,
        configs=chosen, kvpass_compiler=args.kvpass_compiler, kvpress_python=kvpress_python,
        on_update=lambda r: store.write(store.merge(stored, r, order), path),
    )
    results = store.merge(stored, run, order)
    render(results, args.out, args.results_md, plots=not args.no_plots)
    return results


if __name__ == "__main__":
    main()
