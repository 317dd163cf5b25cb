"""bench/analysis/asl_rank_spread.py on a tiny random Llama: one ratio per layer after ASL's first layer, each the
spread of that layer over the first layer's (so finite and non-negative), and ASL's rank store restored."""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import lowering.formats.asl as asl  # noqa: E402
from bench.analysis.asl_rank_spread import spread_ratios  # noqa: E402
from kvpass.models import load_model, save_tiny_llama  # noqa: E402


def test_one_ratio_per_layer_after_the_first(tmp_path):
    layers = 5
    model, _ = load_model(save_tiny_llama(tmp_path, num_hidden_layers=layers))
    model.forward = torch.compile(model.forward, backend="kvpass",
                                  options={"policy": "asl", "budget": 16, "asl_layers": (1, 2), "compiler": "eager"})
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    ratios = spread_ratios(model, ids)
    assert len(ratios) == layers - 2  # layers 2..4 over layer 1
    assert all(math.isfinite(r) and r >= 0 for r in ratios), ratios
    assert asl.rank_spread.__name__ == "rank_spread"  # the recording wrapper is removed again
