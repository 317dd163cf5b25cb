"""bench/e2e/e2e_decode.py's pieces that decide what its rows mean: the loop's mask and the fit probe's search."""
import types

import pytest
import torch

import bench.e2e.e2e_decode as e2e


def test_static_cache_methods_get_a_fixed_width_mask():
    grown = e2e.loop_mask(2, 5, "cpu")["attention_mask"]
    fixed = e2e.loop_mask(2, 5, "cpu", width=9)["attention_mask"]
    assert grown.shape == (2, 5) and bool((grown == 1).all())
    assert fixed.shape == (2, 9) and bool((fixed[:, :5] == 1).all()) and bool((fixed[:, 5:] == 0).all())


@pytest.mark.parametrize("limit", [3, 30, 41, 100])
def test_fit_probe_finds_the_largest_batch_from_two_small_ones(monkeypatch, limit):
    # Peak memory 10 + 2 b GiB of a 100 GiB GPU, and out of memory above ``limit``: the probe predicts from
    # batches 2 and 4, tries the prediction, then steps up while batches fit (at most ``tries`` - 1 more:
    # a lower bound when all fit) or down until one fits.
    seen = {"batch": 0}

    def fake_run(model, forward, name, batch, *args, **kwargs):
        seen["batch"] = batch
        if batch > limit:
            raise torch.OutOfMemoryError("fake")
        cache = types.SimpleNamespace(layers=[])
        return {}, cache

    monkeypatch.setattr(e2e, "decode_run", fake_run)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: (10 + 2 * seen["batch"]) * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(total_memory=100 * 2 ** 30))
    rows = []
    e2e.fit_probe(None, None, "m", 64, [2, 4], "cuda", 256, rows, "smoke", chunk=32, tries=4)
    fits = [r["batch"] for r in rows if r["fits"]]
    assert [r["batch"] for r in rows[:2]] == [2, 4]
    assert all(r["prefill_chunk"] == 32 and r["context"] == 64 for r in rows)
    # 0.9 x 100 GiB at 2 GiB per batch from 18 GiB at batch 4 predicts 40; steps of FIT_STEP (8) from there
    expected = {3: ([2, 4], 2), 30: ([2, 4, 40, 32, 24], 24), 41: ([2, 4, 40, 48], 40),
                100: ([2, 4, 40, 48, 56, 64], 64)}[limit]
    assert [r["batch"] for r in rows] == expected[0], rows
    assert max(fits) == expected[1]
    assert not any(r["fits"] and r["batch"] > limit for r in rows)
    assert all(r["fits"] == (r["batch"] <= limit) for r in rows)
