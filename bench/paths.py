"""Where bench/ keeps its inputs and results (no imports beyond pathlib: the driver and the summary use it)."""

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"  # results/<bench>/<device>/<name>.json (bench/run.py)
RESULTS_MD = BENCH_DIR / "RESULTS.md"
SMOLLM2_ATTENTION = BENCH_DIR / "inputs" / "smollm2_attention.pt"  # bench/quality/capture_attention.py
