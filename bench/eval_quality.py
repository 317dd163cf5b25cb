"""Quality of every kvpass configuration and of the kvpress peer on SmolLM2-135M: the one command.

    python bench/eval_quality.py                  # the recorded run (~45-60 min on 2 CPU cores)
    python bench/eval_quality.py --n 4 --lengths 512 --no-kvpress   # a quick look
    python bench/eval_quality.py --report-only    # re-render RESULTS.md and plots from the JSON

Writes bench/results/quality.json, bench/results/quality_<task>.png and the "Quality on
SmolLM2-135M" section of bench/RESULTS.md. kvpress runs if its environment exists
(bash bench/setup_kvpress_env.sh builds it). ``--model`` takes "smollm2", "tiny" (a random 2-layer
Llama, for smoke tests) or a local Hugging Face model folder.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench.quality import report, runner, tasks  # noqa: E402
from kvpass.models import default_cache_dir, default_model_path, load_model, save_tiny_llama  # noqa: E402

# Sized for ~60 min on 2 shared CPU cores (measured 2026-11-23): a pass over 5 tasks x 50 prompts x
# 512 tokens takes ~8 min eager (prefill 2.5-7 ms/token, varying with the other jobs on the cores);
# kvpass exact adds ~5 min of Inductor compiles (prefill, first decode step, dynamic decode); the
# kvpress peer shares one prefill across its 13 configurations but decodes each (~20 min). 1024
# tokens would double the prefill passes (add --lengths 512 1024, ~2 h). Perplexity texts use the
# prompts' batch size and a 512-token prefix, so kvpass reuses the compiled prefill and decode graphs.
DEFAULTS = {"lengths": [512], "n": 50, "batch_size": 10, "ppl_texts": 10, "ppl_length": 896, "ppl_prefix": 512}


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
    ap.add_argument("--configs", nargs="+", default=["*"], help="glob patterns of main-environment config names")
    ap.add_argument("--no-kvpress", action="store_true")
    ap.add_argument("--kvpress-python", default=str(default_cache_dir() / "kvpress-venv" / "bin" / "python"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--results-md", type=Path, default=REPO / "bench" / "RESULTS.md")
    ap.add_argument("--report-only", action="store_true")
    return ap.parse_args(argv)


def render(results: dict, out: Path, results_md: Path) -> None:
    report.check_schema(results)
    report.write_json(results, out / "quality.json")
    report.plots(results, out)
    rel = lambda p: os.path.relpath(p, results_md.parent)  # noqa: E731
    section = report.markdown(results, rel(out / "quality.json"), rel(out / "quality_<task>.png"))
    report.update_results_md(results_md, section)


def main(argv=None) -> dict:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.report_only:
        results = json.loads((args.out / "quality.json").read_text())
        render(results, args.out, args.results_md)
        return results
    if args.model == "tiny":
        model_path = save_tiny_llama(Path(tempfile.mkdtemp(prefix="kvpass-tiny-")))
    elif args.model == "smollm2":
        model_path = default_model_path()
    else:
        model_path = Path(args.model)
    model, tokenizer = load_model(model_path)
    kvpress_python = None
    if not args.no_kvpress:
        if Path(args.kvpress_python).exists():
            kvpress_python = args.kvpress_python
        else:
            logging.warning("no kvpress environment at %s: run bench/setup_kvpress_env.sh", args.kvpress_python)
    match = lambda c: any(fnmatch.fnmatch(c.name, pat) for pat in args.configs)  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "quality.partial.json"
    results = runner.evaluate(
        model, tokenizer, model_name=args.model, model_path=model_path, task_names=args.tasks,
        lengths=args.lengths, n=args.n, seed=args.seed, batch_size=args.batch_size,
        ppl_texts=args.ppl_texts, ppl_prefix=args.ppl_prefix, ppl_length=args.ppl_length,
        config_filter=match, kvpress_python=kvpress_python,
        on_update=lambda r: partial.write_text(json.dumps(r)),
    )
    render(results, args.out, args.results_md)
    partial.unlink(missing_ok=True)
    return results


if __name__ == "__main__":
    main()
