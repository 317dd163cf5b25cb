"""bench/e2e/fixed_capacity.py's fit probe: the rows it files and the batch they find (the GPU work faked)."""
import types

import pytest
import torch

import bench.e2e.fixed_capacity as fc


@pytest.mark.parametrize("limit", [3, 41])
def test_fit_probe_files_a_row_per_batch_tried_and_finds_the_largest(monkeypatch, limit):
    # Peak memory 10 + 2 b GiB of a 100 GiB GPU, out of memory above ``limit``.
    seen = {"batch": 0}

    def fake_loop(model, method, batch, context, args, counter):
        seen["batch"] = batch
        assert context == 64 and args.warmup == 2 and args.steps == 1
        if batch > limit:
            raise torch.OutOfMemoryError("fake")
        return {"ms_per_token": 1.0}

    monkeypatch.setattr(fc, "decode_loop", fake_loop)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: (10 + 2 * seen["batch"]) * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(total_memory=100 * 2 ** 30))
    model = types.SimpleNamespace(config=types.SimpleNamespace(num_hidden_layers=2))
    args = fc.argparse.Namespace(fit_context=64, fit_batches=[2, 4], fit_tries=4, prefill_chunk=32, warmup=8, steps=64)
    rows = []
    method = next(m for m in fc.METHODS if m.name == "packed-4-ro")
    fc.fit_rows(model, method, "smoke", args, None, rows)
    assert [r["batch"] for r in rows[:2]] == [2, 4]
    assert all(r["fit_probe"] and r["context"] == 64 and r["method"] == "packed-4-ro" for r in rows)
    for r in rows:  # each row says whether its batch fit, and a failure names its error
        assert r["fits"] == (r["batch"] <= limit)
        assert (r["peak_GiB"] == 10 + 2 * r["batch"]) if r["fits"] else "OutOfMemoryError" in r["error"]
    fits = [r["batch"] for r in rows if r["fits"]]
    if limit >= 4:  # the prediction (90 % of 100 GiB: 40) fits, the next step up does not
        assert max(fits) == 40 and any(not r["fits"] for r in rows)
    else:
        assert max(fits) == 2 and len(rows) == 2
