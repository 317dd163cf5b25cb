"""bench/run.py: suites parsed from the data file, every record carries its metadata, and a bundle written
with --out files the same records through ``ingest`` as a local run would."""
import importlib.metadata
import json
import platform
import subprocess
import sys
import textwrap

import pytest

from bench import run

# A suite that writes a JSON under $OUT (its argument and the environment variable it was given), one that
# fails after printing, two that outlive their limits, and one that writes nothing.
WRITER = """import json, os, sys
with open(os.path.join(os.environ["OUT"], "dummy.json"), "w") as f:
    json.dump({"arg": sys.argv[1], "seen": os.environ["SEEN"]}, f)
"""
DUMMY = textwrap.dedent("""
    [driver]
    setup = []

    [suite.writes]
    bench = "dummy"
    description = "writes $OUT/dummy.json"
    command = "{python} {writer} 7"
    json = "dummy.json"
    env = {{ SEEN = "yes" }}
    timeout_s = 60

    [suite.fails]
    bench = "dummy"
    command = "{python} -c 'print(\\"line one\\"); raise SystemExit(3)'"
    timeout_s = 60

    [suite.sleeps]
    bench = "other"
    command = "{python} -c 'import time; print(\\"started\\", flush=True); time.sleep(30)'"
    timeout_s = 1

    [suite.naps]
    bench = "other"
    command = "{python} -c 'import time; time.sleep(60)'"
    timeout_s = 60

    [suite.silent]
    bench = "dummy"
    command = "{python} -c 'pass'"
    json = "missing.json"
    timeout_s = 60
""")


@pytest.fixture
def suites(tmp_path):
    writer = tmp_path / "writer.py"
    writer.write_text(WRITER)
    path = tmp_path / "suites.toml"
    path.write_text(DUMMY.format(python=sys.executable, writer=writer))
    return run.load_suites(path)


def test_the_repository_suites_parse_and_each_runs_a_bench_script_or_the_tests():
    suite_file = run.load_suites()
    assert {"quant", "e2e-8b-packed", "gpu-tests"} <= set(suite_file.suites)
    for suite in suite_file.suites.values():
        words = suite.command.split()
        assert words[0] == "python3" and (words[1].startswith("bench/") or words[1:3] == ["-m", "pytest"]), suite
        if words[1].startswith("bench/"):
            assert (run.REPO / words[1]).is_file(), suite.command
        assert 0 < suite.timeout_s <= 600, suite  # one GPU call runs at most 10 minutes


def test_dummy_suites_parse_with_defaults(suites):
    assert list(suites.suites) == ["writes", "fails", "sleeps", "naps", "silent"]
    writes = suites.suites["writes"]
    assert (writes.bench, writes.json, writes.env, writes.timeout_s) == ("dummy", "dummy.json", {"SEEN": "yes"}, 60)
    assert suites.suites["fails"].json is None and suites.suites["fails"].env == {}


@pytest.mark.parametrize("bad, message", [
    ('[suite.a]\nbench = "b"\ncommand = "x"\n', "missing keys \\['timeout_s'\\]"),
    ('[suite.a]\nbench = "b"\ncommand = "x"\ntimeout_s = 5\njson_file = "y"\n', "unknown keys \\['json_file'\\]"),
    ('[suite.a]\nbench = "b/c"\ncommand = "x"\ntimeout_s = 5\n', "letters, digits"),
    ('[suite.a]\nbench = "b"\ncommand = "x"\ntimeout_s = 0\n', "positive integer"),
    ('[suites.a]\nbench = "b"\n', "unknown top-level tables \\['suites'\\]"),
])
def test_a_malformed_suite_is_refused_with_the_reason(tmp_path, bad, message):
    path = tmp_path / "suites.toml"
    path.write_text(bad)
    with pytest.raises(ValueError, match=message):
        run.load_suites(path)


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090"), (None, "cpu"), ("Some Accelerator", "some-accelerator"),
])
def test_device_slugs(name, slug):
    assert run.device_slug(name) == slug


def test_metadata_names_the_device_code_and_versions(tmp_path):
    meta = run.metadata(device="NVIDIA H100 80GB HBM3")
    assert meta["device"] == "h100" and meta["device_name"] == "NVIDIA H100 80GB HBM3"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=run.REPO, capture_output=True, text=True)
    assert meta["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    for package in ("torch", "triton", "transformers"):
        assert meta[package] == importlib.metadata.version(package)
    import torch

    assert meta["cuda"] == torch.version.cuda and meta["python"] == platform.python_version()
    assert len(meta["source_digest"]) == 64 and meta["date_utc"].endswith("+00:00")
    assert run.metadata(device="cpu", commit="abc")["git_commit"] == "abc"


def test_a_local_run_files_one_record_per_suite_with_result_and_status(tmp_path, suites):
    records = run.run(["writes", "fails", "sleeps", "silent"], suites, None, False, "cpu", "c0ffee", None,
                      results_root=tmp_path)
    by_suite = {r["suite"]: r for r in records}
    assert by_suite["writes"]["result"] == {"arg": "7", "seen": "yes"} and by_suite["writes"]["rc"] == 0
    assert by_suite["fails"]["rc"] == 3 and "line one" in by_suite["fails"]["log_tail"]
    assert by_suite["fails"]["result"] is None and "note" not in by_suite["fails"]
    assert by_suite["sleeps"]["timed_out"] and by_suite["sleeps"]["rc"] == run.TIMEOUT_RC
    assert "started" in by_suite["sleeps"]["log_tail"] and by_suite["sleeps"]["wall_s"] < 20
    assert by_suite["silent"]["note"] == "the command wrote no missing.json"
    for record in records:
        assert record["meta"]["device"] == "cpu" and record["meta"]["git_commit"] == "c0ffee"
        path = tmp_path / record["bench"] / "cpu" / f"{record['meta']['date_utc'][:10]}_{record['suite']}.json"
        assert json.loads(path.read_text()) == record
    # A second run the same day keeps the first record and files a numbered sibling.
    again = run.run(["writes"], suites, None, False, "cpu", "c0ffee", None, results_root=tmp_path)
    assert len(list((tmp_path / "dummy" / "cpu").glob("*_writes*.json"))) == 2 and again[0]["rc"] == 0


def test_a_bundle_ingests_into_the_files_a_local_run_writes(tmp_path, suites):
    out = tmp_path / "out"
    records = run.run(["writes", "fails"], suites, out, False, "NVIDIA H200", None, None)
    assert sorted(p.name for p in out.iterdir()) == [run.BUNDLE_NAME, run.LOG_NAME]  # 2 files come back
    bundle = json.loads((out / run.BUNDLE_NAME).read_text())
    assert bundle["kind"] == run.BUNDLE_KIND and bundle["records"] == json.loads(json.dumps(records))
    assert "=== fails" in (out / run.LOG_NAME).read_text()
    filed = run.ingest(out / run.BUNDLE_NAME, tmp_path / "results")
    assert [p.relative_to(tmp_path / "results").parts[:2] for p in filed] == [("dummy", "h200")] * 2
    for path, record in zip(filed, bundle["records"]):
        assert json.loads(path.read_text()) == record
        assert path == run.record_path(tmp_path / "results", record)


def test_ingest_names_the_commit_only_when_the_source_matches(tmp_path, monkeypatch):
    record = {"suite": "s", "bench": "b", "meta": {"device": "h100", "date_utc": "2026-12-07T01:02:03+00:00",
                                                   "git_commit": None, "source_digest": "d1"}}
    bundle = tmp_path / "results.json"
    run.write_bundle(bundle, [record])
    monkeypatch.setattr(run, "git_state", lambda root=run.REPO: ("f00d", False))
    for digest, commit in (("d2", None), ("d1", "f00d")):
        monkeypatch.setattr(run, "source_digest", lambda root=run.REPO, digest=digest: digest)
        [path] = run.ingest(bundle, tmp_path / "r", overwrite=True)
        assert path == tmp_path / "r" / "b" / "h100" / "2026-12-07_s.json"
        assert json.loads(path.read_text())["meta"]["git_commit"] == commit


def test_ingest_refuses_a_file_that_is_no_bundle(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a bench bundle"):
        run.ingest(path, tmp_path)


def test_the_time_limit_cuts_a_suite_short_and_skips_the_rest(tmp_path, suites, monkeypatch):
    # No metadata queries (a second of git and a torch import in a child): the limit is the suites' own.
    fake = {**dict.fromkeys(["device_name", "git_commit", "torch", "triton", "transformers", "cuda"], "x"),
            "device": "cpu", "date_utc": "2026-12-07T00:00:00+00:00"}
    monkeypatch.setattr(run, "metadata", lambda device, commit: fake)
    records = run.run(["naps", "writes"], suites, tmp_path / "out", False, "cpu", None, 3.0)
    assert [r["suite"] for r in records] == ["naps"]
    assert records[0]["timeout_s"] == 2 and records[0]["timed_out"]


def test_unknown_suites_are_named(suites):
    with pytest.raises(SystemExit, match="unknown suites \\['nope'\\]"):
        run.run(["nope"], suites, None, False, "cpu", None, None)
