"""Run named benchmark suites and file their results; unpack a bundle of results brought back from a GPU.

    python -m bench.run list                                  # the suites of bench/suites.toml
    python -m bench.run quant e2e-8b-packed                   # results into bench/results/<bench>/<device>/
    python -m bench.run --setup quant --out $OUT              # on the GPU machine: $OUT/results.json + $OUT/run.log
    python -m bench.run ingest /path/to/results.json          # back here: into bench/results/<bench>/<device>/

A suite (``bench/suites.toml``) names its command, its time limit, the bench it belongs to and the JSON file
the command writes under ``$OUT``. The driver runs each suite in a fresh ``$OUT`` folder of its own and
keeps a *record* per run: the suite, the command, its exit status and wall time, the tail of its output,
the metadata of the run (device, date, git commit, torch / triton / transformers / CUDA versions) and the
JSON the command wrote (``result``). A record is filed as ``bench/results/<bench>/<device>/<date>_<suite>.json``.

With ``--out DIR`` (the GPU machine, whose calls bring back at most 8 files) the records go into ONE bundle,
``DIR/results.json``, rewritten after every suite so a run cut off keeps what finished, and the full output
of every suite into ``DIR/run.log``. ``ingest`` files a bundle's records where a local run would have.

The GPU machine gets a copy of the working tree without git: the driver then records ``git_commit`` as
null and a digest of the source (``source_digest``); ``ingest`` fills in the local HEAD when the local
source has the same digest, so a record names a commit only when it is known to be the code that ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib

from bench.paths import BENCH_DIR, REPO, RESULTS_DIR

SUITES_FILE = BENCH_DIR / "suites.toml"
LOGS_DIR = BENCH_DIR / "logs"  # ignored by git
BUNDLE_NAME, LOG_NAME = "results.json", "run.log"
BUNDLE_KIND = "kvpass-bench-bundle"
TAIL_LINES = 60  # output lines kept in a record (the whole output goes to the log)
TIMEOUT_RC = 124  # what `timeout` returns, so records read like the shell diary's did
# Files whose digest identifies the code that ran (results and logs excluded).
SOURCE_GLOBS = ("kvpass/**/*.py", "lowering/**/*.py", "bench/**/*.py", "bench/suites.toml", "pyproject.toml")
VERSIONED_PACKAGES = ("torch", "triton", "transformers")


@dataclasses.dataclass(frozen=True)
class Suite:
    """One named run: ``command`` (a shell-like string) writes ``json`` under ``$OUT`` (or nothing)."""

    name: str
    bench: str
    command: str
    timeout_s: int
    description: str = ""
    json: str | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SuiteFile:
    suites: dict[str, Suite]
    setup: tuple[str, ...] = ()


_SUITE_KEYS = {f.name for f in dataclasses.fields(Suite)} - {"name"}


def load_suites(path: Path = SUITES_FILE) -> SuiteFile:
    """Parse a suites file: ``[driver] setup = [...]`` and one ``[suite.NAME]`` table per suite."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    unknown = set(data) - {"driver", "suite"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level tables {sorted(unknown)} (allowed: driver, suite)")
    suites = {}
    for name, table in data.get("suite", {}).items():
        extra = set(table) - _SUITE_KEYS
        missing = {"bench", "command", "timeout_s"} - set(table)
        if extra or missing:
            raise ValueError(f"{path}: suite {name!r}: unknown keys {sorted(extra)}, missing keys {sorted(missing)}"
                             f" (allowed: {sorted(_SUITE_KEYS)})")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not re.fullmatch(r"[A-Za-z0-9_.-]+", table["bench"]):
            raise ValueError(f"{path}: suite {name!r}: names are letters, digits, '.', '_' and '-'")
        if not isinstance(table["timeout_s"], int) or table["timeout_s"] <= 0:
            raise ValueError(f"{path}: suite {name!r}: timeout_s must be a positive integer")
        suites[name] = Suite(name=name, **table)
    return SuiteFile(suites, tuple(data.get("driver", {}).get("setup", ())))


def device_slug(name: str | None) -> str:
    """``h100`` for "NVIDIA H100 80GB HBM3", ``h200`` for "NVIDIA H200", ``cpu`` without a GPU."""
    if not name:
        return "cpu"
    model = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    if model:
        return model.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _command_output(args: list[str], cwd: Path = REPO) -> str | None:
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi (no CUDA context in the driver), None without one."""
    out = _command_output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def source_digest(root: Path = REPO) -> str:
    """sha256 over the sorted paths and contents of the files in ``SOURCE_GLOBS``."""
    digest = hashlib.sha256()
    paths = sorted({p for pattern in SOURCE_GLOBS for p in root.glob(pattern)
                    if p.is_file() and "__pycache__" not in p.parts})
    for p in paths:
        digest.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return digest.hexdigest()


def git_state(root: Path = REPO) -> tuple[str | None, bool | None]:
    """(HEAD, whether tracked files differ from it), or (None, None) outside a git checkout."""
    commit = _command_output(["git", "rev-parse", "HEAD"], root)
    if commit is None:
        return None, None
    status = _command_output(["git", "status", "--porcelain", "--untracked-files=no"], root)
    return commit, bool(status)


def cuda_version() -> str | None:
    """The CUDA torch was built with, asked of a child process: the driver holds no torch and no GPU."""
    out = _command_output([sys.executable, "-c", "import torch; print(torch.version.cuda)"])
    return None if out in (None, "None") else out


def metadata(device: str | None = None, commit: str | None = None) -> dict:
    """What a record needs to be compared: device, date, code and versions.

    ``device`` overrides the detected GPU name ("cpu" without a GPU); ``commit`` the git HEAD."""
    name = device if device is not None else (gpu_name() or "cpu")
    head, dirty = git_state()
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    meta = {
        "device_name": name,
        "device": device_slug(None if name == "cpu" else name),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit or head,
        "git_dirty": None if commit else dirty,
        "source_digest": source_digest(),
        "python": platform.python_version(),
        **versions,
        "cuda": cuda_version(),
        "host": platform.machine(),
    }
    driver = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if driver:
        meta["nvidia_driver"] = driver.splitlines()[0].strip()
    return meta


def record_name(record: dict) -> str:
    return f"{record['meta']['date_utc'][:10]}_{record['suite']}"


def record_path(root: Path, record: dict) -> Path:
    """Where a record is filed: ``root/<bench>/<device>/<date>_<suite>.json``."""
    return root / record["bench"] / record["meta"]["device"] / f"{record_name(record)}.json"


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run_suite(suite: Suite, meta: dict, log, time_left: float | None = None) -> dict:
    """Run ``suite`` with ``$OUT`` a fresh folder; return its record. ``log``: a text file for the output."""
    timeout = suite.timeout_s if time_left is None else max(1, min(suite.timeout_s, int(time_left)))
    env = {**os.environ, **suite.env, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix=f"bench-{suite.name}-") as out:
        env["OUT"] = out
        started = time.monotonic()
        # A session of its own, so a timeout ends the command's children too.
        proc = subprocess.Popen(shlex.split(suite.command), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
            rc, timed_out = proc.returncode, False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            rc, timed_out = TIMEOUT_RC, True
        wall = time.monotonic() - started
        result, note = None, None
        if suite.json:
            path = Path(out) / suite.json
            if path.is_file():
                with open(path) as f:
                    result = json.load(f)
            else:
                note = f"the command wrote no {suite.json}"
    log.write(f"=== {suite.name} ({suite.command}) rc={rc}{' (timed out)' if timed_out else ''} {wall:.1f}s\n")
    log.write(output)
    log.flush()
    record = {"suite": suite.name, "bench": suite.bench, "description": suite.description,
              "command": suite.command, "env": suite.env, "timeout_s": timeout, "rc": rc, "timed_out": timed_out,
              "wall_s": round(wall, 2), "meta": meta, "log_tail": _tail(output), "result": result}
    if note:
        record["note"] = note
    return record


def write_bundle(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump({"kind": BUNDLE_KIND, "version": 1, "records": records}, f, indent=1, default=str)
    tmp.replace(path)


def file_record(root: Path, record: dict, overwrite: bool = False) -> Path:
    """Write ``record`` to its place under ``root``; an existing file gets a numbered sibling unless
    ``overwrite``."""
    path = record_path(root, record)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 2
    while path.exists() and not overwrite:
        path = path.with_name(f"{record_name(record)}-{n}.json")
        n += 1
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=str)
        f.write("\n")
    return path


def ingest(bundle_path: Path, root: Path = RESULTS_DIR, overwrite: bool = False) -> list[Path]:
    """File every record of a bundle under ``root``; fill in ``git_commit`` where the source matches."""
    with open(bundle_path) as f:
        bundle = json.load(f)
    if bundle.get("kind") != BUNDLE_KIND:
        raise ValueError(f"{bundle_path} is not a bench bundle (kind {bundle.get('kind')!r})")
    head, dirty = git_state()
    local_digest = source_digest()
    written = []
    for record in bundle["records"]:
        meta = record["meta"]
        if meta.get("git_commit") is None and head and not dirty and meta.get("source_digest") == local_digest:
            meta["git_commit"], meta["git_dirty"] = head, False
            meta["git_commit_from"] = "ingest: the local HEAD's source has the run's source_digest"
        written.append(file_record(root, record, overwrite))
    return written


def run(names: list[str], suite_file: SuiteFile, out: Path | None, setup: bool, device: str | None,
        commit: str | None, time_limit_s: float | None, results_root: Path = RESULTS_DIR) -> list[dict]:
    """Run the suites ``names`` in order; file the records (``out``: one bundle there). Returns them."""
    unknown = [n for n in names if n not in suite_file.suites]
    if unknown:
        raise SystemExit(f"unknown suites {unknown}; known: {', '.join(suite_file.suites)}")
    started = time.monotonic()
    if setup:
        for command in suite_file.setup:
            print(f"=== setup: {command}", flush=True)
            done = subprocess.run(shlex.split(command), cwd=REPO)
            if done.returncode:
                print(f"setup command failed (rc {done.returncode}): {command}", flush=True)
    meta = metadata(device, commit)
    print(f"=== {meta['device_name']} ({meta['device']}), commit {meta['git_commit']}, torch {meta['torch']}, "
          f"triton {meta['triton']}, transformers {meta['transformers']}, CUDA {meta['cuda']}", flush=True)
    log_dir = out if out is not None else LOGS_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / (LOG_NAME if out is not None else f"{meta['date_utc'][:10]}_{'_'.join(names)}.log")
    records = []
    with open(log_path, "a") as log:
        for name in names:
            left = None if time_limit_s is None else time_limit_s - (time.monotonic() - started)
            if left is not None and left < 1:
                print(f"=== {name}: skipped (past --time-limit-s {time_limit_s:g})", flush=True)
                continue
            suite = suite_file.suites[name]
            print(f"=== {name} ({datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}Z, limit "
                  f"{suite.timeout_s}s): {suite.command}", flush=True)
            record = run_suite(suite, {**meta, "date_utc": _now()}, log, left)
            records.append(record)
            print(record["log_tail"], flush=True)
            print(f"=== {name} rc={record['rc']}{' (timed out)' if record['timed_out'] else ''} "
                  f"{record['wall_s']}s; json: {'yes' if record['result'] is not None else 'none'}", flush=True)
            if out is not None:
                write_bundle(out / BUNDLE_NAME, records)
            else:
                print(f"    filed {file_record(results_root, record)}", flush=True)
    print(f"log: {log_path}" + (f"; bundle: {out / BUNDLE_NAME}" if out is not None else ""), flush=True)
    return records


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ingest"]:
        ap = argparse.ArgumentParser(prog="python -m bench.run ingest",
                                     description="file a bundle's records under bench/results/<bench>/<device>/")
        ap.add_argument("bundle", type=Path)
        ap.add_argument("--results", type=Path, default=RESULTS_DIR)
        ap.add_argument("--overwrite", action="store_true", help="replace a record of the same name and day")
        args = ap.parse_args(argv[1:])
        for path in ingest(args.bundle, args.results, args.overwrite):
            print(f"filed {path}")
        print("RESULTS.md's summary reads them after: python -m bench.summary")
        return 0
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("suites", nargs="+", help="suite names from the suites file, or 'list'")
    ap.add_argument("--suites-file", type=Path, default=SUITES_FILE)
    ap.add_argument("--out", type=Path, default=None,
                    help="write one bundle DIR/results.json and DIR/run.log instead of filing under bench/results")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR, help="where records are filed without --out")
    ap.add_argument("--setup", action="store_true", help="first run the suites file's [driver] setup commands")
    ap.add_argument("--device", default=None, help="device name to record instead of nvidia-smi's")
    ap.add_argument("--commit", default=None, help="git commit to record (where the tree has no git)")
    ap.add_argument("--time-limit-s", type=float, default=None,
                    help="all suites together: a suite's limit is cut to what is left, later ones skipped")
    args = ap.parse_args(argv)
    suite_file = load_suites(args.suites_file)
    if args.suites == ["list"]:
        for suite in suite_file.suites.values():
            print(f"{suite.name:24} {suite.bench:20} {suite.timeout_s:4}s  {suite.description}")
        return 0
    records = run(args.suites, suite_file, args.out, args.setup, args.device, args.commit, args.time_limit_s,
                  args.results)
    return 0 if all(r["rc"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
