"""A Triton kernel that fails to compile for some constants must never crash a model: its launcher raises
:class:`KernelCompileError`, and the caller falls back to its torch reference.

Triton compiles a kernel the first time a launch asks for a new set of constants; a compiler bug for one
shape (a front-end ``CompilationError``, or ``RuntimeError: PassManager::run failed`` from an MLIR pass of a
backend) would otherwise surface in the middle of a model's forward. ``OutOfResources`` is not a compile
failure here: the decode launcher shrinks its tiles for it.
"""
from __future__ import annotations


class KernelCompileError(RuntimeError):
    """A kernel failed to compile for the constants a launch asked for; nothing was launched."""


def is_compile_failure(error: BaseException) -> bool:
    """Whether ``error`` was raised while Triton compiled a kernel (its front end, or a pass of a backend),
    rather than by a launch or by a bug in the caller."""
    if type(error).__module__.startswith("triton.compiler"):
        return True
    tb = error.__traceback__
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if "/triton/compiler/" in path or "/triton/backends/" in path:
            return True
        tb = tb.tb_next
    return False


def summary(error: BaseException) -> str:
    """One line naming a compile failure, for logs and ``lowering.core.stats.calls``."""
    first = next((line for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first[:160]}"
