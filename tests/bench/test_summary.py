"""bench/summary.py on a fixture of result JSONs: each target's best value is the ratio the timings give,
taken within one run, on the target's device only; met / not met / not measured rows; only the region
between the markers of RESULTS.md is rewritten."""
import json
import textwrap

import pytest

from bench import run, summary

TARGETS = textwrap.dedent("""
    [[target]]
    id = "int8-8x32k"
    issue = 25
    description = "int8 vs SDPA, 8 x 32k"
    bench = "attention_quant"
    device = "h100"
    where = { scheme = "8", B = 8, L = 32768, D = 128 }
    num = { path = "raw.sdpa_s" }
    den = { path = "raw.kernel_s" }
    op = ">="
    threshold = 1.8

    [[target]]
    id = "int4-8x32k"
    issue = 25
    description = "int4 vs SDPA, 8 x 32k"
    bench = "attention_quant"
    device = "h100"
    where = { scheme = "4", B = 8, L = 32768, D = 128 }
    num = { path = "raw.sdpa_s" }
    den = { path = "raw.kernel_s" }
    op = ">="
    threshold = 3.0

    [[target]]
    id = "int8-d64"
    issue = 25
    description = "int8 vs SDPA, 8 x 32k, D=64"
    bench = "attention_quant"
    device = "h100"
    where = { scheme = "8", B = 8, L = 32768, D = 64 }
    num = { path = "raw.sdpa_s" }
    den = { path = "raw.kernel_s" }
    op = ">="
    threshold = 1.62

    [[target]]
    id = "int4-e2e"
    issue = 24
    description = "int4 over exact RO"
    bench = "e2e_decode"
    where = { shape = "llama3-8b", batch = 8, context = 32768 }
    num = { path = "tokens_per_s", where = { method = "kvpass-int4" } }
    den = { path = "tokens_per_s", where = { method = "kvpass-exact-static-ro" } }
    op = ">="
    threshold = 2.0

    [[target]]
    id = "int4-memory"
    issue = 24
    description = "int4 KV bytes over bf16"
    bench = "e2e_decode"
    where = { shape = "llama3-8b", batch = 8, context = 32768 }
    num = { path = "kv_bytes", where = { method = "kvpass-int4" } }
    den = { path = "kv_bytes", where = { method = ["inductor", "kvpass-exact-static-ro"] }, agg = "min" }
    op = "<="
    threshold = 0.3
""")


def _quant_row(scheme, batch, kv_len, kernel_s, sdpa_s):
    return {"scheme": scheme, "data": "normal", "B": batch, "L": kv_len,
            "raw": {"kernel_s": kernel_s, "sdpa_s": sdpa_s, "floor_s": kernel_s / 2}}


def _e2e_row(method, tokens_per_s, kv_bytes, batch=8):
    return {"shape": "llama3-8b", "method": method, "batch": batch, "context": 32768,
            "tokens_per_s": tokens_per_s, "kv_bytes": kv_bytes}


def _write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    env = lambda date: {"environment": {"date_utc": f"{date}T10:00:00+00:00"}, "shape": {"D": 128}}  # noqa: E731
    # Two H100 runs of int8: 2.0 and 1.5x (the best, 2.0x, is met); int4 at 2.5x (not met); an H200 run that
    # would meet int4 but is on the wrong device; a D=64 target nothing measures.
    _write(root / "attention_quant/h100/2026-12-01_a.json",
           {**env("2026-12-01"), "rows": [_quant_row("8", 8, 32768, 50e-6, 100e-6),
                                          _quant_row("4", 8, 32768, 40e-6, 100e-6),
                                          _quant_row("8", 1, 32768, 10e-6, 100e-6)]})  # other shape: ignored
    _write(root / "attention_quant/h100/2026-12-03_b.json",
           {**env("2026-12-03"), "rows": [_quant_row("8", 8, 32768, 60e-6, 90e-6),
                                          {"scheme": "4", "data": "normal", "B": 8, "L": 32768,
                                           "target": "FAILED: OOM"}]})  # a failed row has no value
    _write(root / "attention_quant/h200/2026-12-02_c.json",
           {**env("2026-12-02"), "rows": [_quant_row("4", 8, 32768, 10e-6, 100e-6)]})
    # e2e: int4 and exact RO are never in the same run in the first two files, so no ratio crosses them;
    # the third, a bench/run.py record, has both: 450 / 200 = 2.25x.
    _write(root / "e2e_decode/h200/2026-11-23_x.json",
           {"environment": {"date_utc": "2026-11-23T00:00:00+00:00"},
            "rows": [_e2e_row("kvpass-int4", 1000.0, 30), _e2e_row("inductor", 50.0, 100)]})
    _write(root / "e2e_decode/h200/2026-11-24_y.json",
           {"environment": {"date_utc": "2026-11-24T00:00:00+00:00"},
            "rows": [_e2e_row("kvpass-exact-static-ro", 100.0, 101)]})
    record = {"suite": "e2e-8b-packed", "bench": "e2e_decode",
              "meta": {"device": "h100", "date_utc": "2026-12-07T01:00:00+00:00"},
              "result": {"environment": {}, "rows": [_e2e_row("kvpass-int4", 450.0, 40),
                                                     _e2e_row("kvpass-exact-static-ro", 200.0, 100),
                                                     _e2e_row("kvpass-int4", 9999.0, 1, batch=1)]}}
    _write(run.record_path(root, record), record)
    targets = tmp_path / "targets.toml"
    targets.write_text(TARGETS)
    return root, summary.load_targets(targets)


def test_each_target_takes_its_best_ratio_from_one_run_on_its_device(results):
    root, targets = results
    outcomes = {t.id: summary.evaluate(t, root) for t in targets}
    int8 = outcomes["int8-8x32k"]
    assert int8.value == pytest.approx(100e-6 / 50e-6) and int8.met is True
    assert int8.source.path.name == "2026-12-01_a.json" and int8.source.date.startswith("2026-12-01")
    int4 = outcomes["int4-8x32k"]
    assert int4.value == pytest.approx(2.5) and int4.met is False and int4.source.device == "h100"
    assert outcomes["int8-d64"].value is None and outcomes["int8-d64"].met is None
    e2e = outcomes["int4-e2e"]
    assert e2e.value == pytest.approx(450 / 200) and e2e.met is True and e2e.source.device == "h100"
    assert e2e.source.date == "2026-12-07T01:00:00+00:00"
    memory = outcomes["int4-memory"]  # lower is better: 30 / 100 in the first file beats 40 / 100
    assert memory.value == pytest.approx(0.3) and memory.met is True
    assert memory.source.path.name == "2026-11-23_x.json"


def test_the_table_says_met_not_met_and_not_measured(results, tmp_path):
    root, targets = results
    text = summary.region([summary.evaluate(t, root) for t in targets], tmp_path)
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines() if line.startswith("| #")}
    assert rows["#25 int8 vs SDPA, 8 x 32k: >= 1.80x"].endswith(
        "[2.00x](results/attention_quant/h100/2026-12-01_a.json) | h100 | 2026-12-01 | **met** |")
    assert rows["#25 int4 vs SDPA, 8 x 32k: >= 3.00x"].endswith("| h100 | 2026-12-01 | no |")
    assert rows["#25 int8 vs SDPA, 8 x 32k, D=64: >= 1.62x"] == (
        "| #25 int8 vs SDPA, 8 x 32k, D=64: >= 1.62x | not measured | h100 | | |")
    assert "3 of 5 targets met, 1 not measured." in text


def test_only_the_marked_region_is_rewritten(results, tmp_path):
    root, _ = results
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Results\n\n{summary.BEGIN}\nold table\n{summary.END}\n\n## Current\nkept\n")
    targets = tmp_path / "targets.toml"
    argv = ["--targets", str(targets), "--results", str(root), "--results-md", str(md)]
    assert summary.main(argv + ["--check"]) == 1
    assert summary.main(argv) == 0
    text = md.read_text()
    assert text.startswith(f"# Results\n\n{summary.BEGIN}\n3 of 5 targets met") and text.endswith("## Current\nkept\n")
    assert "old table" not in text and text.count(summary.BEGIN) == 1
    assert summary.main(argv + ["--check"]) == 0


def test_a_results_md_without_the_region_is_refused():
    with pytest.raises(ValueError, match="exactly one"):
        summary.rewrite("# Results\n", "x")


def test_malformed_targets_are_refused(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(TARGETS.replace('op = "<="', 'op = "=<"'))
    with pytest.raises(ValueError, match="op must be one of"):
        summary.load_targets(path)
    path.write_text(TARGETS.replace('agg = "min"', 'agg = "mean"'))
    with pytest.raises(ValueError, match="a side is"):
        summary.load_targets(path)


def test_the_repository_targets_cover_both_issues_and_results_md_is_current():
    targets = summary.load_targets()
    assert {t.issue for t in targets} == {24, 25}
    # issue #25: 3 schemes x (3 shapes + the floor) on the H100 at D=128 and D=64, and on the H200
    assert sum(t.issue == 25 for t in targets) == 36
    assert summary.main(["--check"]) == 0
