"""Named configurations the quality runner evaluates: eager, kvpass option dicts, and kvpress presses.

kvpass configurations are plain option dicts for ``torch.compile(..., backend="kvpass",
options=...)``. Today only the exact mode compiles; every other value raises NotImplementedError at
compile time, which the runner records as a "not implemented" row, so each later issue (policies,
quantized caches, early exit) only reruns ``bench/eval_quality.py``. If an option name here drifts
from ``kvpass``'s options dataclass, the row says "invalid options" with the backend's message:
update the names below, in this one place.

Budgets are fractions of the prompt kept in the cache (1/4, 1/8, 1/16). For kvpress they apply to
the context part of the prompt (its protocol compresses the context, then reads the question
uncompressed); the question is 20-50 tokens, so the two differ by at most 10% of the prompt.
"""

from __future__ import annotations

import dataclasses

BUDGETS = (1 / 4, 1 / 8, 1 / 16)
try:  # the backend's own lists, so a value it adds is evaluated without editing this file
    from kvpass.options import KV_BITS as _KV_BITS
    from kvpass.options import POLICIES as _POLICIES
except ImportError:  # the runner then records kvpass rows as unavailable
    _POLICIES, _KV_BITS = ("full", "streaming", "h2o", "snapkv", "asl", "adore"), (16, 8, 4, "fp8", "aligned")
POLICIES = tuple(p for p in _POLICIES if p != "full")
KV_BITS = tuple(b for b in _KV_BITS if b != 16)
# kvpass defines early_exit as a relative tolerance with no default value yet; 1e-3 is ART's
# direction threshold (1 - cosine, shared/papers.md). Follow kvpass's default once it has one.
EARLY_EXIT_DEFAULT = 1e-3
KVPRESS_PRESSES = ("snapkv", "streaming_llm", "expected_attention", "pyramidkv")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    engine: str  # "eager" | "kvpass" | "kvpress"
    options: dict | None = None  # kvpass options
    press: str | None = None  # kvpress press name
    budget: float | None = None  # fraction of the prompt (context for kvpress) kept

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def options_for(self, length: int) -> dict:
        """kvpass options at a prompt length: the budget fraction becomes tokens per layer and KV head."""
        opts = dict(self.options or {})
        if self.budget is not None:
            opts["budget"] = max(1, round(self.budget * length))
        return opts


def _budget_tag(budget: float) -> str:
    return f"1/{round(1 / budget)}"


def main_configs() -> list[Config]:
    """Configurations run in the main environment, the exact ones first (the others compare to them)."""
    out = [
        Config("eager/full", "eager"),
        Config("kvpass/exact", "kvpass", {}),
    ]
    out += [
        Config(f"kvpass/{policy}@{_budget_tag(b)}", "kvpass", {"policy": policy}, budget=b)
        for policy in POLICIES
        for b in BUDGETS
    ]
    out += [Config(f"kvpass/kv_bits={bits}", "kvpass", {"kv_bits": bits}) for bits in KV_BITS]
    out.append(Config("kvpass/early_exit", "kvpass", {"early_exit": EARLY_EXIT_DEFAULT}))
    # What users would pick together: a compressed cache, quantized, with early exit on top.
    out += [
        Config("kvpass/snapkv@1/8+kv4", "kvpass", {"policy": "snapkv", "kv_bits": 4}, budget=1 / 8),
        Config("kvpass/adore@1/8+kv4", "kvpass", {"policy": "adore", "kv_bits": 4}, budget=1 / 8),
        Config(
            "kvpass/asl@1/8+kv8+early_exit",
            "kvpass",
            {"policy": "asl", "kv_bits": 8, "early_exit": EARLY_EXIT_DEFAULT},
            budget=1 / 8,
        ),
        Config("kvpass/kv4+early_exit", "kvpass", {"kv_bits": 4, "early_exit": EARLY_EXIT_DEFAULT}),
    ]
    return out


def kvpress_configs() -> list[Config]:
    """The peer's configurations: its full cache, then each press at each budget."""
    out = [Config("kvpress/none", "kvpress", press=None)]
    out += [
        Config(f"kvpress/{press}@{_budget_tag(b)}", "kvpress", press=press, budget=b)
        for press in KVPRESS_PRESSES
        for b in BUDGETS
    ]
    return out
