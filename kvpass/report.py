"""What the backend did: per compiled graph, per attention site, the pattern, the cache idiom, the
variant and its lowering, or why the site was left as it was.

``kvpass.report()`` returns a :class:`Report` (structured; ``str()`` gives a table). With
``KVPASS_LOG=1`` each graph's table is logged to stderr at compile time.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field

from lowering.core import stats as lowering_stats
from lowering.core.stats import calls

log = logging.getLogger("kvpass")

REWRITTEN, LEFT = "rewritten", "left"

NOTHING_COMPILED = (
    "kvpass: no graph compiled yet. If you wrote `model = torch.compile(model, backend=\"kvpass\")` and then "
    "called `model.generate(...)`: torch.compile returns a wrapper whose `generate` is the original model's, "
    "whose forward is not compiled, so kvpass never ran. Compile the model in place instead: "
    "`model.compile(backend=\"kvpass\", options={...})` or `kvpass.compile(model, **options)`.")


class NothingCompiledWarning(UserWarning):
    """``kvpass.report()`` or ``kvpass.stats()`` was asked while no graph had been compiled with kvpass."""


@dataclass(frozen=True)
class SiteRecord:
    graph: int
    index: int
    module: str
    pattern: str
    cache: str  # cache idiom feeding the keys ("none" when attention reads no cache)
    status: str  # REWRITTEN or LEFT
    variant: str = ""  # the variant applied, when rewritten
    lowering: str = ""  # how the rewritten op runs
    reason: str = ""  # why the site was left, or notes (GQA expansion stripped, other cache readers)

    @property
    def cuda_graphs(self) -> str:
        """Whether this site can run under CUDA graphs (``mode="reduce-overhead"``): "yes", or "no: why"."""
        return capturability(self)


def capturability(s: SiteRecord) -> str:
    if s.status == REWRITTEN and s.lowering.startswith("cache_attention"):
        return ("no: a packed DynamicCache's slots change shape every step and its buffer grows inside the op "
                "(PackedCache is the capturable packed cache)")
    if s.cache == "dynamic_cache_cat":
        return "no: a DynamicCache grows by cat, a new shape every step (StaticCache or PackedCache capture)"
    return "yes"


@dataclass
class GraphRecord:
    graph: int
    options: dict
    sites: list[SiteRecord] = field(default_factory=list)
    compile_seconds: float = 0.0


@dataclass
class Report:
    graphs: list[GraphRecord] = field(default_factory=list)

    @property
    def sites(self) -> list[SiteRecord]:
        return [s for g in self.graphs for s in g.sites]

    @property
    def rewritten(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == REWRITTEN]

    @property
    def left(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == LEFT]

    def to_dict(self) -> dict:
        graphs = [asdict(g) for g in self.graphs]
        for g, record in zip(graphs, self.graphs):
            for site, s in zip(g["sites"], record.sites):
                site["cuda_graphs"] = s.cuda_graphs
        return {"graphs": graphs}

    def __str__(self) -> str:
        if not self.graphs:
            return NOTHING_COMPILED
        return "\n\n".join(format_graph(g) for g in self.graphs)

    def summary(self) -> str:
        """One line per graph and distinct site outcome (pattern, cache idiom, status, variant and lowering
        or reason), its modules folded: ``model.layers.{0..29}.self_attn`` instead of 30 lines."""
        if not self.graphs:
            return NOTHING_COMPILED
        lines = []
        for g in self.graphs:
            lines.append(_graph_header(g))
            groups: dict[tuple, list[str]] = {}
            for s in g.sites:
                outcome = f"{_outcome(s)} [CUDA graphs: {s.cuda_graphs}]"
                groups.setdefault((s.pattern, s.cache, s.status, outcome), []).append(s.module or "?")
            for (pattern, cache, status, outcome), modules in groups.items():
                lines.append(f"  {len(modules):3d} x {fold_modules(modules)}  {pattern}  {cache}  {status}  {outcome}")
        return "\n".join(lines)


def _graph_header(g: GraphRecord) -> str:
    return (f"kvpass graph {g.graph}: {len(g.sites)} attention site(s), options {g.options}, "
            f"rewrite {g.compile_seconds * 1e3:.1f} ms")


def _outcome(s: SiteRecord) -> str:
    if s.status != REWRITTEN:
        return s.reason
    return f"{s.variant}: {s.lowering}" + (f" ({s.reason})" if s.reason else "")


def fold_modules(modules: list[str]) -> str:
    """Module paths differing only in their numeric parts, folded: ['h.0.attn', 'h.1.attn', 'h.3.attn'] ->
    'h.{0..1,3}.attn'; paths of different shapes are joined with ', '."""
    shapes: dict[str, list[list[int]]] = {}
    for m in modules:
        shape = re.sub(r"(?<![^.])\d+(?![^.])", "{}", m)
        shapes.setdefault(shape, []).append([int(n) for n in re.findall(r"(?<![^.])\d+(?![^.])", m)])
    out = []
    for shape, numbers in shapes.items():
        if not numbers[0]:
            out.append(shape)
            continue
        columns = [sorted(set(col)) for col in zip(*numbers)]
        out.append(shape.format(*(_ranges(c) if len(c) > 1 else str(c[0]) for c in columns)))
    return ", ".join(out)


def _ranges(values: list[int]) -> str:
    """Sorted distinct ints as '{0..29}', '{0,1,5..7}'."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    parts = [f"{r[0]}..{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs]
    return "{" + ",".join(parts) + "}"


def format_graph(g: GraphRecord) -> str:
    header = ("#", "module", "pattern", "cache", "status", "variant / lowering or reason")
    rows = [(str(s.index), s.module or "?", s.pattern, s.cache, s.status,
             f"{_outcome(s)} [CUDA graphs: {s.cuda_graphs}]") for s in g.sites]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = [_graph_header(g)]
    for r in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return "\n".join(lines)


_lock = threading.Lock()
_REPORT = Report()
counters: Counter = Counter()  # "graphs", "sites_rewritten", "sites_left", "pattern:<name>", "cache:<idiom>"


def record_graph(g: GraphRecord) -> None:
    with _lock:
        _REPORT.graphs.append(g)
        counters["graphs"] += 1
        for s in g.sites:
            counters["sites_" + s.status] += 1
            counters["pattern:" + s.pattern] += 1
            counters["cache:" + s.cache] += 1
    if os.environ.get("KVPASS_LOG", "") not in ("", "0"):
        _ensure_handler()
        log.info("%s", format_graph(g))


def next_graph_id() -> int:
    with _lock:
        return len(_REPORT.graphs)


def report() -> Report:
    """A snapshot of everything compiled so far in this process (since the last ``reset()``); warns
    (``NothingCompiledWarning``, naming the fix) when that is nothing."""
    warn_if_nothing_compiled()
    with _lock:
        return Report(list(_REPORT.graphs))


def warn_if_nothing_compiled() -> None:
    """The first place kvpass can see that ``model = torch.compile(model, backend="kvpass")`` compiled nothing
    (the wrapper's ``generate`` runs the uncompiled model, and no kvpass code runs then)."""
    with _lock:
        empty = not _REPORT.graphs
    if empty:
        warnings.warn(NOTHING_COMPILED, NothingCompiledWarning, stacklevel=3)


def reset() -> None:
    """Forget the report, the compile-time counters and the run-time statistics."""
    with _lock:
        _REPORT.graphs.clear()
        counters.clear()
        calls.clear()
        lowering_stats.clear()


def _ensure_handler() -> None:
    # Only when the user asked for the log: no handler is installed at import.
    if not any(getattr(h, "_kvpass", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler._kvpass = True
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
