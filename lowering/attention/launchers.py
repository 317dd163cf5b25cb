"""The one place triton is imported: the kernel launchers, loaded when a kernel is first needed.

triton is an optional dependency (the ``triton`` extra), and a ``@triton.jit`` kernel is defined for the
interpreter or for the GPU when its module is imported: under ``TRITON_INTERPRET=1`` (tests on the CPU)
that must happen after the variable is set. So nothing imports a launcher or kernel module at import
time: code that may launch a kernel calls :func:`load`, which imports them all once, or :func:`missing`
to ask whether it can.
"""
from __future__ import annotations

import dataclasses
import functools
from types import ModuleType


@dataclasses.dataclass(frozen=True)
class Launchers:
    """The launcher modules of ``lowering.attention``."""

    decode: ModuleType  # lowering.attention.decode.launcher
    scored: ModuleType  # lowering.attention.scored.launcher
    early_exit: ModuleType  # lowering.attention.early_exit.launcher
    append: ModuleType  # lowering.attention.append.launcher
    slots: ModuleType  # lowering.attention.slots.launcher


@functools.lru_cache(maxsize=None)
def _import() -> Launchers | ImportError:
    try:
        from lowering.attention.append import launcher as append
        from lowering.attention.decode import launcher as decode
        from lowering.attention.early_exit import launcher as early_exit
        from lowering.attention.scored import launcher as scored
        from lowering.attention.slots import launcher as slots
    except ImportError as e:  # triton missing
        return e
    return Launchers(decode=decode, scored=scored, early_exit=early_exit, append=append, slots=slots)


def missing() -> str | None:
    """None when the kernels can be launched, else why not (for fallback reasons)."""
    found = _import()
    return f"triton unavailable ({found})" if isinstance(found, ImportError) else None


def load() -> Launchers:
    """The launchers; ImportError when triton is missing (check :func:`missing` first to fall back)."""
    found = _import()
    if isinstance(found, ImportError):
        raise found
    return found
