"""Nsight Compute's view of the packed decode kernels: where their time goes (issue #25).

    python3 bench/kernels/decode_ncu.py                        # GPU: ncu over itself, per scheme and point
    python3 bench/kernels/decode_ncu.py --schemes 4 --points 8x32768
    python3 bench/kernels/decode_ncu.py --child --smoke        # CPU: the child's work, tiny, under the interpreter

The problem is ``attention_quant.py``'s (Hq=32, Hkv=8, D=128, bf16, one query row, no mask). For each scheme and
B x L a child process packs the cache and launches the kernel twice (compile, warm); a third launch runs between
``cudaProfilerStart`` and ``cudaProfilerStop``. ncu (``--profile-from-start off --clock-control none``, METHOD.md:
the clocks are left alone) reports that launch's kernels, stage 1 and the merge, as a raw CSV page.

Per kernel the JSON holds its duration, DRAM throughput, achieved occupancy, registers per thread, cycles per
issued instruction and the warp stall reasons, largest first: cycles per issued instruction spent in each state,
from the ``smsp__average_warps_issue_stalled_*_per_issue_active`` metrics. Every ncu CSV is kept under ``$OUT``.
With ``--source-schemes`` those schemes' points are also profiled with the SourceCounters section (PC sampling)
and the report's SASS page is read back: the point's ``source`` names the instructions that hold the most warp-stall
samples (``top``) and the samples per opcode (``opcodes``), which says which part of the loop stalls.
A point that fails (ncu missing, counters refused, out of memory) is a row with its error; the others still run.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

if "--smoke" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

from bench.common import environment  # noqa: E402
from bench.kernels import attention_quant as aq  # noqa: E402
from lowering.formats.launch import kernel_decode_attention  # noqa: E402

SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "MemoryWorkloadAnalysis")
STALL_PREFIX, STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"
NAMED = {  # metric -> the JSON's name for it
    "gpu__time_duration.sum": "duration",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct_of_peak",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "launch__registers_per_thread": "registers_per_thread",
    "launch__grid_size": "grid_size",
    "launch__block_size": "block_size",
    "smsp__average_warp_latency_per_inst_issued.ratio": "cycles_per_issued_instruction",
}


def parse_raw_csv(text: str) -> list[dict]:
    """ncu's ``--page raw --csv`` output: a header of metric names, a row of units, then a row per kernel ->
    per kernel {"kernel": name, metrics named in ``NAMED``, "stalls": [(reason, cycles per issue), largest
    first], "units": {name: unit}}. Lines before the header (ncu's own messages) are skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header, units, kernels = rows[0], rows[1], rows[2:]
    out = []
    for values in kernels:
        if len(values) != len(header):
            continue
        raw = dict(zip(header, values))
        unit = dict(zip(header, units))
        entry = {"kernel": raw.get("Kernel Name", "?"), "units": {}}
        for metric, name in NAMED.items():
            if metric in raw:
                entry[name] = _number(raw[metric])
                entry["units"][name] = unit.get(metric, "")
        stalls = [(metric[len(STALL_PREFIX):-len(STALL_SUFFIX)], _number(value)) for metric, value in raw.items()
                  if metric.startswith(STALL_PREFIX) and metric.endswith(STALL_SUFFIX)]
        entry["stalls"] = sorted(((r, v) for r, v in stalls if isinstance(v, float)), key=lambda s: -s[1])
        out.append(entry)
    return out


def _number(value: str):
    try:
        return float(value.replace(",", ""))
    except ValueError:
        return value


def parse_source_csv(text: str, top: int = 40) -> dict:
    """ncu's ``--page source --csv --print-source sass`` page -> {"top": the ``top`` instructions with the most
    warp-stall samples [(address, SASS, samples, not-issued samples)], "opcodes": {opcode: samples}, largest first,
    "total": all samples}. Columns are found by name (ncu versions word them a little differently); a page without a
    sampling column gives an empty result."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if '"Source"' in line or line.startswith('"Address"')), None)
    if start is None:
        return {"top": [], "opcodes": {}, "total": 0.0}
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header = rows[0]
    col = {name: i for i, name in enumerate(header)}
    src = col.get("Source")
    addr = col.get("Address", 0)
    sampled = [i for i, name in enumerate(header) if "Sampling" in name and "Not" not in name]
    not_issued = [i for i, name in enumerate(header) if "Sampling" in name and "Not" in name]
    if src is None or not sampled:
        return {"top": [], "opcodes": {}, "total": 0.0, "header": header}
    entries, opcodes = [], {}
    for row in rows[1:]:
        if len(row) != len(header):
            continue
        samples = _number(row[sampled[0]])
        if not isinstance(samples, float):
            continue
        late = _number(row[not_issued[0]]) if not_issued else None
        sass = row[src].strip()
        entries.append((row[addr], sass, samples, late if isinstance(late, float) else None))
        opcode = re.sub(r"^@!?U?P\w+\s+", "", sass).split(" ")[0]
        opcodes[opcode] = opcodes.get(opcode, 0.0) + samples
    entries.sort(key=lambda e: -e[2])
    return {"top": entries[:top], "opcodes": dict(sorted(opcodes.items(), key=lambda o: -o[1])),
            "total": sum(e[2] for e in entries)}


def child(scheme_key: str, batch: int, kv_len: int, smoke: bool) -> None:
    """The profiled process: pack, launch twice, launch once inside the profiler's range."""
    if smoke:
        aq.DEVICE, aq.HQ, aq.HKV, aq.HEAD_DIM = "cpu", 4, 2, 16
    scheme = aq.scheme_of(scheme_key)
    q, k, v = aq.make_cache(batch, kv_len, "normal", seed=1)
    _, state = aq.pack(scheme, k, v)
    for _ in range(2):
        kernel_decode_attention(scheme, q, state, kv_len, None, None)
    if q.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
    out = kernel_decode_attention(scheme, q, state, kv_len, None, None)
    if q.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print(f"child done: {scheme_key} {batch}x{kv_len}, out {tuple(out.shape)} finite {bool(out.isfinite().all())}")


def profile_point(scheme_key: str, batch: int, kv_len: int, out_dir: Path, timeout_s: int) -> dict:
    row = {"scheme": scheme_key, "B": batch, "L": kv_len}
    command = ["ncu", "--profile-from-start", "off", "--clock-control", "none", "--csv", "--page", "raw"]
    for section in SECTIONS:
        command += ["--section", section]
    command += [sys.executable, os.path.abspath(__file__), "--child", "--schemes", scheme_key,
                "--points", f"{batch}x{kv_len}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    name = f"ncu_{scheme_key}_{batch}x{kv_len}.csv"
    (out_dir / name).write_text(done.stdout + ("\n# stderr\n" + done.stderr if done.stderr else ""))
    row["csv"] = name
    row["kernels"] = parse_raw_csv(done.stdout)
    if done.returncode != 0 or not row["kernels"]:  # the output's ends go into the JSON: the CSV stays on the GPU
        row["error"] = f"ncu rc={done.returncode}"
        row["stdout_head"], row["stdout_tail"] = done.stdout[:1500], done.stdout[-1500:]
        row["stderr_tail"] = done.stderr[-1500:]
    return row


def profile_source(scheme_key: str, batch: int, kv_len: int, timeout_s: int) -> dict:
    """The same launch under the SourceCounters section (PC sampling), its report's SASS page parsed
    (``parse_source_csv``); an error string in place of the page when ncu fails."""
    child_args = [sys.executable, os.path.abspath(__file__), "--child", "--schemes", scheme_key,
                  "--points", f"{batch}x{kv_len}"]
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "source")
        try:
            done = subprocess.run(["ncu", "--profile-from-start", "off", "--clock-control", "none", "--section",
                                   "SourceCounters", "--section", "WarpStateStats", "-o", report, *child_args],
                                  capture_output=True, text=True, timeout=timeout_s)
            if done.returncode != 0:
                return {"error": f"ncu rc={done.returncode}", "stderr_tail": done.stderr[-1500:]}
            page = subprocess.run(["ncu", "--import", report + ".ncu-rep", "--page", "source", "--csv",
                                   "--print-source", "sass"], capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"error": f"{type(e).__name__}: {e}"}
    parsed = parse_source_csv(page.stdout)
    if page.returncode != 0 or not parsed["top"]:
        parsed["error"] = f"source page rc={page.returncode}"
        parsed["stdout_head"], parsed["stderr_tail"] = page.stdout[:3000], page.stderr[-1500:]
    return parsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schemes", nargs="*", default=["4", "8", "fp8"])
    parser.add_argument("--points", nargs="*", default=["1x32768", "8x32768"], help="BxL ...")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--timeout-s", type=int, default=120, help="per point")
    parser.add_argument("--source-schemes", nargs="*", default=[],
                        help="schemes whose points are also profiled per SASS instruction (SourceCounters)")
    parser.add_argument("--child", action="store_true", help="the profiled process (one scheme, one point)")
    parser.add_argument("--smoke", action="store_true", help="with --child: tiny shapes on the CPU interpreter")
    args = parser.parse_args(argv)
    points = [tuple(int(x) for x in p.split("x")) for p in args.points]
    if args.child:
        for batch, kv_len in points:
            child(args.schemes[0], batch, kv_len, args.smoke)
        return 0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for key in args.schemes:
        for batch, kv_len in points:
            rows.append(profile_point(key, batch, kv_len, out_dir, args.timeout_s))
            if key in args.source_schemes:
                rows[-1]["source"] = profile_source(key, batch, kv_len, args.timeout_s)
            (out_dir / "decode_ncu.json").write_text(json.dumps({"environment": environment(), "rows": rows},
                                                                indent=1, default=str))
            summary = [(k["kernel"][:40], k.get("duration"), k["stalls"][:3]) for k in rows[-1].get("kernels", [])]
            print(json.dumps({"scheme": key, "B": batch, "L": kv_len, "error": rows[-1].get("error"),
                              "kernels": summary}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
