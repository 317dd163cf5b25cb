"""License-clean English prose for haystacks, documents and perplexity: the standard library's docstrings.

The text ships with Python itself (PSF license), so nothing is downloaded. Paragraphs are filtered
to prose (no doctests, >= 90% letters and spaces, >= 120 characters) and deduplicated, in a fixed
module and attribute order, so the pool is identical on every run of the same Python version
(3.11: 638 paragraphs, ~26.5k words, ~35k tokens). The version is recorded with the results.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import warnings

# Pure-Python modules with long prose docstrings; none needs a GUI or network at import.
_MODULES = (
    "argparse asyncio base64 bisect calendar collections contextlib copy csv dataclasses datetime decimal "
    "difflib email enum fractions functools getopt gzip heapq html http.client imaplib inspect ipaddress "
    "json logging mailbox mimetypes numbers optparse os pathlib pickle pprint queue random re sched "
    "selectors shelve shlex shutil smtplib socket statistics string subprocess tarfile tempfile textwrap "
    "threading timeit tokenize traceback typing unittest urllib.parse uuid warnings weakref zipfile zipimport"
).split()


@functools.lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of the standard library's docstrings, in a fixed order."""
    seen: dict[str, None] = {}
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stripped-down Python; the pool just gets smaller
            continue
        with warnings.catch_warnings():  # typing.io and friends warn on access; we only read docstrings
            warnings.simplefilter("ignore", DeprecationWarning)
            members = [getattr(module, attr, None) for attr in sorted(dir(module)) if not attr.startswith("_")]
        for obj in [module, *members]:
            if obj is not module and (inspect.ismodule(obj) or getattr(obj, "__module__", None) != name):
                continue  # re-exports would repeat other modules' text
            for para in re.split(r"\n\s*\n", inspect.getdoc(obj) or ""):
                para = " ".join(para.split())
                if len(para) >= 120 and ">>>" not in para and _prose_fraction(para) >= 0.9:
                    seen.setdefault(para)
    return tuple(seen)


def _prose_fraction(text: str) -> float:
    return sum(ch.isalpha() or ch == " " for ch in text) / len(text)


def sentences() -> tuple[str, ...]:
    """The paragraphs split into sentences (on '. ' followed by a capital), in order."""
    out: list[str] = []
    for para in paragraphs():
        out.extend(s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para) if s.strip())
    return tuple(out)
