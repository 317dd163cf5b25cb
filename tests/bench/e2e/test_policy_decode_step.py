"""bench/e2e/policy_decode_step.py times the paths it names: the in-place rows are served in place, every step,
and the time per step is the timed window over the timed steps only."""
import types

import torch

import bench.e2e.policy_decode_step as bench
from lowering.formats import FormatSpec


def test_each_path_serves_the_steps_it_is_named_for(monkeypatch):
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(2))
    q = torch.randn(1, 4, 64, 16, generator=g)
    # A clock read when the timed steps start (after 2 warm-up steps) and when they end: 10 s then 16 s.
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(readings)))
    for flag, expected in ((False, 0), (True, 5)):
        spec = FormatSpec(policy="snapkv", budget=16, replace_in_place=flag).to_json()
        readings = iter([10.0, 16.0])
        seconds, served, nbytes, _, kept = bench.time_steps(spec, q, k, v, 40, 3, 2, "cpu")
        assert seconds == 2.0  # (16 - 10) / 3 timed steps: the 2 warm-up steps are not in the window
        assert next(readings, None) is None  # the clock was read exactly twice
        assert served == expected  # 2 warm-up + 3 timed steps, all in place when the switch is on
        # 16 kept rows of k and v (fp32, D=16) plus 8 bytes of position and score per row, per KV head
        assert nbytes == 2 * 16 * (2 * 16 * 4 + 8)
        assert kept.shape == (1, 2, 16) and (kept.diff(dim=-1) > 0).all() and int(kept.max()) < 45
