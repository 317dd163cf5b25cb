"""Named configurations the quality runner evaluates: eager, kvpass option dicts, and kvpress presses.

kvpass configurations are plain option dicts for ``torch.compile(..., backend="kvpass",
options=...)``. Today only the exact mode compiles; every other value raises NotImplementedError at
compile time, which the runner records as a "not implemented" row, so each later issue (policies,
quantized caches, early exit) only reruns its own rows (``--only 'kvpass/kv_bits*'``). If an option
name here drifts from ``kvpass``'s options dataclass, the row says "invalid options" with the
backend's message: update the names below, in this one place.

Budgets are fractions of the prompt kept in the cache (1/4, 1/8, 1/16): ``round(b * L)`` tokens per
layer and KV head, 128 / 64 / 32 at L = 512.

The kvpress peer runs two protocols on the same token ids:
- ``kvpress/...`` (the main rows, compared with kvpass): the whole prompt, question included, is
  prefilled under the press and compressed to ``int(b * L)`` tokens, then the answer is decoded;
  this is what kvpass's policies do (query-aware: the question ends the prompt, inside SnapKV's
  observation window).
- ``kvpress-ctx/...`` (kvpress's own pipeline): the context (the prompt minus the batch's longest
  question) is compressed to ``int(b * context)`` tokens, then the question is read uncompressed at
  its original positions and the answer decoded. The press never sees the question.

SnapKV and PyramidKV run with an observation window of 8 tokens, not kvpress's default 64: at
1/8 and 1/16 of 512 tokens the budget (64, 32) is no larger than a 64-token window, which SnapKV
always keeps whole (its scores pad the window with max + 1), so the default keeps only the last
64 (or 32 of them, tie-broken arbitrarily) positions, with no attention sinks and no selection at
all (the first recorded run measured +160% perplexity at 1/8, against +22% for StreamingLLM).
8 is what the PyramidKV authors' harness (KVCache-Factory, ``run_longbench.py``) uses for budgets 64
to 2048. Measured on SmolLM2 at 512 tokens (query-aware protocol, 2026-11-23): perplexity at 1/8
38.48 with window 64, 18.40 with window 8 (StreamingLLM 18.44; eager 14.6); at 1/4 17.61 and
17.81; passkey (25 prompts) at 1/4 0% and 16%.
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
# early_exit=True is kvpass's default tolerance (lowering.early_exit.DEFAULT_TOLERANCE, 1e-3 relative
# today), so the row follows the default if it changes.
EARLY_EXIT_DEFAULT = True
# Press name -> constructor arguments besides compression_ratio (see the module docstring).
KVPRESS_PRESSES = {
    "snapkv": {"window_size": 8},
    "streaming_llm": {},
    "expected_attention": {},
    "pyramidkv": {"window_size": 8},
}
PROTOCOLS = {"prompt": "kvpress", "context": "kvpress-ctx"}  # protocol -> name prefix


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    engine: str  # "eager" | "kvpass" | "kvpress"
    options: dict | None = None  # kvpass options
    press: str | None = None  # kvpress press name
    budget: float | None = None  # fraction of the prompt (kvpress-ctx: of the context) kept
    press_kwargs: dict | None = None  # kvpress press arguments besides compression_ratio
    protocol: str | None = None  # kvpress: "prompt" (query-aware) or "context" (its pipeline's)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def options_for(self, length: int, compiler: str | None = None) -> dict:
        """kvpass options at a prompt length: the budget fraction becomes tokens per layer and KV head."""
        opts = dict(self.options or {})
        if self.budget is not None:
            opts["budget"] = max(1, round(self.budget * length))
        if compiler is not None:
            opts["compiler"] = compiler
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
            "kvpass/adore@1/8+kv4+early_exit",
            "kvpass",
            {"policy": "adore", "kv_bits": 4, "early_exit": EARLY_EXIT_DEFAULT},
            budget=1 / 8,
        ),
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
    """The peer's configurations: its full cache, then each press at each budget, in both protocols."""
    out = [Config("kvpress/none", "kvpress", protocol="prompt")]
    for protocol, prefix in PROTOCOLS.items():
        out += [
            Config(f"{prefix}/{press}@{_budget_tag(b)}", "kvpress", press=press, budget=b,
                   press_kwargs=dict(kwargs), protocol=protocol)
            for press, kwargs in KVPRESS_PRESSES.items()
            for b in BUDGETS
        ]
    return out


def all_configs() -> list[Config]:
    """Every configuration, in the order tables list them."""
    return main_configs() + kvpress_configs()
