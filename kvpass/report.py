"""What the backend did: per compiled graph, per attention site, the pattern, the cache idiom, the
variant and its lowering, or why the site was left as it was.

``kvpass.report()`` returns a :class:`Report` (structured; ``str()`` gives a table). With
``KVPASS_LOG=1`` each graph's table is logged to stderr at compile time.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field

log = logging.getLogger("kvpass")

REWRITTEN, LEFT = "rewritten", "left"


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
                "(kvpass.PackedCache is the capturable packed cache)")
    if s.cache == "dynamic_cache_cat":
        return "no: a DynamicCache grows by cat, a new shape every step (StaticCache or kvpass.PackedCache capture)"
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
            return "kvpass: no graph compiled yet"
        return "\n\n".join(format_graph(g) for g in self.graphs)


def format_graph(g: GraphRecord) -> str:
    header = ("#", "module", "pattern", "cache", "status", "variant / lowering or reason")
    rows = [(str(s.index), s.module or "?", s.pattern, s.cache, s.status,
             (f"{s.variant}: {s.lowering}" + (f" ({s.reason})" if s.reason else "")
              if s.status == REWRITTEN else s.reason) + f" [CUDA graphs: {s.cuda_graphs}]") for s in g.sites]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = [f"kvpass graph {g.graph}: {len(g.sites)} attention site(s), options {g.options}, "
             f"rewrite {g.compile_seconds * 1e3:.1f} ms"]
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
    """A snapshot of everything compiled so far in this process (since the last ``reset()``)."""
    with _lock:
        return Report(list(_REPORT.graphs))


def reset() -> None:
    """Forget the report, the compile-time counters and the run-time statistics."""
    import lowering.stats
    from lowering.ops import calls

    with _lock:
        _REPORT.graphs.clear()
        counters.clear()
        calls.clear()
        lowering.stats.clear()


def _ensure_handler() -> None:
    # Only when the user asked for the log: no handler is installed at import.
    if not any(getattr(h, "_kvpass", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler._kvpass = True
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
