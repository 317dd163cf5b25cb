"""Shared benchmark utilities: timing (median and quantiles), the copy-bandwidth ceiling, the
environment record, poisoning, and JSON output to ``$OUT``.

Timings follow /work/.library/device/METHOD.md: device events, warm-up first, medians of many
repeats. ``time_cold`` times eager calls after reading a large buffer (cold, clean L2);
``time_graph`` replays a CUDA graph of calls rotating over input sets larger than the L2 (no
launch gaps, the steady state of a CUDA-graphed decode loop); ``time_do_bench`` is
``triton.testing.do_bench`` (for comparison with numbers taken that way).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time

import torch


@dataclasses.dataclass
class Timing:
    """Seconds: median and the 20th/80th percentiles."""

    median: float
    p20: float
    p80: float

    @property
    def us(self) -> float:
        return self.median * 1e6


def _wall_clock(fn, reps: int = 5) -> Timing:
    # CPU-only fallback, so the scripts can be smoke-tested without a GPU (numbers meaningless).
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=10) if reps > 1 else times * 9
    return Timing(statistics.median(times), q[1], q[7])


def time_do_bench(fn, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """``triton.testing.do_bench``: events; the L2 is cleared before each call by writing zeros.

    The write leaves the L2 full of dirty lines that the timed call then writes back (about 50 MB
    on an H100), which slows a memory-bound call by ~15 us: ``time_cold`` avoids that.
    """
    if not torch.cuda.is_available():
        return _wall_clock(fn)
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(*(x * 1e-3 for x in ms))


# Random-weight Llama configurations of the end-to-end benches (bench/e2e/), by the real model they mimic.
MODEL_SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256),
}

_FLUSH = {}


def time_cold(fn, reps: int = 100, warmup: int = 10, flush_bytes: int = 256 << 20) -> Timing:
    """Time ``fn()`` with events, eagerly, after reading a buffer 5x the L2 (cold, clean cache).

    Reading rather than writing leaves no dirty lines behind; the ~90 us read also lets the host
    run ahead, so launch overhead below that is hidden, as in a steady decode loop.
    """
    if not torch.cuda.is_available():
        return _wall_clock(fn)
    if flush_bytes not in _FLUSH:
        _FLUSH[flush_bytes] = torch.ones(flush_bytes // 4, dtype=torch.int32, device="cuda")
    flush = _FLUSH[flush_bytes]
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.max()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) * 1e-3 for start, end in events]
    q = statistics.quantiles(times, n=10)
    return Timing(statistics.median(times), q[1], q[7])


def launch_overhead(fn, calls: int = 300) -> float:
    """Host seconds per call of ``fn`` when its device work is tiny (the launch path's cost)."""
    if torch.cuda.is_available():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return elapsed / calls


def time_graph(fns, calls_per_replay: int = 20, replays: int = 15) -> Timing:
    """Time one call of ``fns`` (closures over distinct input sets, called in turn) by CUDA-graph replay.

    The graph holds ``calls_per_replay`` calls; each replay is timed with events and divided by
    that count. Rotating over input sets larger than the L2 keeps the cache from serving reruns.
    """
    if not torch.cuda.is_available():
        return _wall_clock(lambda: [fn() for fn in fns])
    for fn in fns:  # compile and warm up outside the capture
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in range(calls_per_replay):
            fns[c % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / calls_per_replay)
    del graph
    q = statistics.quantiles(times, n=10)
    return Timing(statistics.median(times), q[1], q[7])


def copy_bandwidth(nbytes: int = 2 << 30, device="cuda") -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    if not torch.cuda.is_available():
        nbytes, device = min(nbytes, 64 << 20), "cpu"
    src = torch.randint(-(1 << 15), 1 << 15, (nbytes // 2,), dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    t = time_do_bench(lambda dst=dst, src=src: dst.copy_(src), rep_ms=200)
    del src, dst
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return 2 * nbytes / t.median


def environment() -> dict:
    """What a result needs to be reproduced and compared: device, date, versions."""
    import triton

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1),
                   l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
        try:
            import subprocess
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return env


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN so that any element a kernel fails to write shows up."""
    return t.fill_(float("nan"))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ||out - ref|| / ||ref|| in float64; NaN anywhere gives NaN."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def write_json(name: str, payload: dict) -> str | None:
    """Write ``payload`` to ``$OUT/name`` when ``OUT`` is set; return the path."""
    out_dir = os.environ.get("OUT")
    if not out_dir:
        return None
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A fixed-width text table of ``rows`` restricted to ``columns``."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
