"""The backend's options: one validated dataclass, checked once at compile time.

Users pass a plain dict through ``torch.compile(..., backend="kvpass", options={...})``;
:func:`parse_options` turns it into :class:`KVPassOptions` or raises a ``ValueError`` that names the
key and the allowed values. The allowed ``policy`` and ``kv_bits`` values are the lowering registries'
(``lowering.formats.FORMATS``, ``lowering.storage.SCHEMES``): a policy or scheme that registers itself is
accepted without editing this file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from lowering.formats import FORMATS
from lowering.storage import SCHEMES

COMPILERS = ("inductor", "eager")
# torch.compile refuses mode= together with options=, so the Inductor mode travels as an option.
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The registries' values: "full" first, then the policies by name; bit widths (ints) widest first, then names.
POLICIES = tuple(sorted(FORMATS, key=lambda p: (p != "full", p)))
KV_BITS = tuple(sorted((int(k) if k.isdigit() else k for k in SCHEMES),
                       key=lambda b: (isinstance(b, str), -b if isinstance(b, int) else 0, str(b))))


def implemented() -> dict[str, set]:
    """Option values that work: the lowering registries' (every allowed value is registered)."""
    return {"policy": set(POLICIES), "kv_bits": set(KV_BITS)}


@dataclass(frozen=True)
class KVPassOptions:
    """What the kvpass backend does to each attention site.

    policy: cache compression policy; "full" keeps every token (exact).
    budget: tokens kept per layer and KV head for compressing policies (None with "full").
    kv_bits: cache storage: 16 (the model's own dtype, exact), 8, 4, "fp8", "aligned".
    early_exit: None (read every KV block), True (the default tolerance, 1e-3) or a relative tolerance t:
        decode attention stops reading KV blocks once a proven bound says the unread ones cannot move
        each query row's output by more than t in relative L2 norm (lowering/attention/early_exit/bound.py).
    decode_kernel: on CUDA, run decode-sized attention (query length <= 16) through kvpass's Triton
        kernel; False keeps torch's SDPA for every site (exact mode only; useful to compare).
    compiler: "inductor" (default) lowers the rewritten graph with Inductor; "eager" runs it as is, op by
        op, like torch's "eager" debug backend (quick to compile: for the CPU demo, debugging, fast tests).
    mode: the Inductor mode (as torch.compile's ``mode=``, which torch.compile does not accept together
        with ``options=``): None, "default", "reduce-overhead" (CUDA graphs), "max-autotune", ...
    replace_in_place: budgeted policies whose decode scores need no rows (streaming, snapkv, asl) write the new
        token over the evicted one in the cache's own buffer once the hot set is full
        (lowering/formats/slot_replacement.py): None (default) does so on CUDA, True everywhere, False never
        (False keeps every earlier cache state of a generation readable, at the cost of a copy per step).
    asl_layers: with policy "asl", (first_layer, span): the first layer whose ranking may settle the selection
        and how many layers' rankings its spread is taken over (lowering/formats/asl.py); None: the paper's
        (10, 8), set for 32-layer models; a shallower model may want smaller values.
    """

    policy: str = "full"
    budget: int | None = None
    kv_bits: int | str = 16
    early_exit: float | None = None
    decode_kernel: bool = True
    compiler: str = "inductor"
    mode: str | None = None
    replace_in_place: bool | None = None
    asl_layers: tuple[int, int] | None = None

    @property
    def is_exact(self) -> bool:
        return self.policy == "full" and self.kv_bits == 16 and self.early_exit is None


_FIELDS = {f.name: f for f in dataclasses.fields(KVPassOptions)}


def _check(key: str, ok: bool, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"kvpass option {key!r}: got {value!r}; allowed: {allowed}")


def parse_options(options: Mapping[str, Any] | KVPassOptions | None) -> KVPassOptions:
    """Validate user options; raise ValueError naming the key and the allowed values."""
    if options is None:
        return KVPassOptions()
    if isinstance(options, KVPassOptions):
        opts = options
    else:
        if not isinstance(options, Mapping):
            raise ValueError(f"kvpass options must be a dict, got {type(options).__name__}")
        unknown = sorted(set(options) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown kvpass option(s) {unknown}; allowed: {sorted(_FIELDS)}")
        opts = KVPassOptions(**options)
    _validate(opts)
    if isinstance(opts.asl_layers, list):  # a list from JSON or a user: the frozen options hold a tuple
        opts = dataclasses.replace(opts, asl_layers=tuple(opts.asl_layers))
    return opts


def _validate(o: KVPassOptions) -> None:
    _check("policy", isinstance(o.policy, str) and o.policy in POLICIES, str(list(POLICIES)), o.policy)
    _check("kv_bits", o.kv_bits in KV_BITS and not isinstance(o.kv_bits, bool), str(list(KV_BITS)), o.kv_bits)
    budget_ok = o.budget is None or (isinstance(o.budget, int) and not isinstance(o.budget, bool) and o.budget > 0)
    _check("budget", budget_ok, "None or a positive int (tokens per layer and KV head)", o.budget)
    if o.policy == "full":
        _check("budget", o.budget is None, "None with policy 'full' (set a compressing policy to use a budget)",
               o.budget)
    else:
        _check("budget", o.budget is not None, f"a positive int with policy {o.policy!r}", o.budget)
    # early_exit: None reads every KV block; a tolerance t in [0, 1) stops decode attention once the unread
    # blocks provably cannot change any query row's output by more than t relative (L2 norm per row, see
    # lowering/attention/early_exit/bound.py); True means the default tolerance,
    # lowering.formats.early_exit.DEFAULT_TOLERANCE = 1e-3.
    exit_ok = o.early_exit is None or o.early_exit is True or (
        isinstance(o.early_exit, (int, float)) and not isinstance(o.early_exit, bool) and 0 <= o.early_exit < 1
    )
    _check("early_exit", exit_ok, "None, True (tolerance 1e-3) or a relative tolerance in [0, 1)", o.early_exit)
    _check("compiler", o.compiler in COMPILERS, str(list(COMPILERS)), o.compiler)
    _check("mode", o.mode in MODES, str(list(MODES)), o.mode)
    _check("decode_kernel", isinstance(o.decode_kernel, bool), "True or False", o.decode_kernel)
    _check("replace_in_place", o.replace_in_place is None or isinstance(o.replace_in_place, bool),
           "None, True or False", o.replace_in_place)
    layers_ok = o.asl_layers is None or (
        o.policy == "asl" and isinstance(o.asl_layers, (tuple, list)) and len(o.asl_layers) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in o.asl_layers)
        and o.asl_layers[0] >= 0 and o.asl_layers[1] >= 1)
    _check("asl_layers", layers_ok, "None, or with policy 'asl' a pair (first_layer >= 0, span >= 1) of ints",
           o.asl_layers)
