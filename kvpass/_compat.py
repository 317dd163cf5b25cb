"""Every private torch API kvpass touches, in one place (Dynamo and Inductor internals move between
releases; kvpass supports torch 2.11 to 2.13)."""
from __future__ import annotations

from typing import Any, Callable

from torch._dynamo.backends import registry
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.utils import counters
from torch._inductor import list_mode_options
from torch._inductor.compile_fx import compile_fx

try:
    from torch._dynamo.exc import ShortenTraceback
except ImportError:  # a torch without it: a backend's error reaches the user inside BackendCompilerFailed
    ShortenTraceback = None


def register_backend_once(name: str, compiler_fn: Callable[..., Any]) -> None:
    """Register ``compiler_fn`` as a Dynamo backend unless the entry point path is doing it.

    When ``torch.compile(backend="kvpass")`` runs before ``import kvpass``, Dynamo finds the backend
    through the ``torch_dynamo_backends`` entry point and registers it itself right after importing
    us; registering here too would then fail with "duplicate name".
    """
    if name in registry._COMPILER_FNS or registry._BACKENDS.get(name) is not None:
        return
    registry.register_backend(compiler_fn=compiler_fn, name=name)


def inductor_compile(gm, example_inputs, mode: str | None):
    """Hand a (rewritten) Dynamo graph to Inductor, with the config a torch.compile ``mode`` implies."""
    patches = dict(list_mode_options(mode)) if mode else {}
    return compile_fx(gm, example_inputs, config_patches=patches)


def eager_compile(gm, example_inputs):
    """Run the rewritten graph as it is, op by op (what torch's "eager" debug backend does: no AOTAutograd
    trace, so the fewest host calls per step)."""
    return gm.forward


def dynamo_compile_count() -> int:
    """How many frames Dynamo has compiled in this process (``unique_graphs``), for recompile checks."""
    return int(counters["stats"]["unique_graphs"])


def through_dynamo(error: Exception) -> Exception:
    """``error`` as an instance of a subclass of its own type that Dynamo re-raises unwrapped.

    Dynamo wraps whatever a backend raises in ``BackendCompilerFailed``, except its own
    ``ShortenTraceback`` family (``OutputGraph.call_user_compiler``; tested on torch 2.13), so a bad option
    would reach the user as a RuntimeError around our ValueError. The returned exception is both: ``except
    ValueError`` catches it at the model's call, and its message is ours.
    """
    if ShortenTraceback is None:
        return error
    kind = type(error)
    passing = _PASSING.get(kind)
    if passing is None:
        def __init__(self, *args):
            ShortenTraceback.__init__(self, *args, first_useful_frame=None)

        passing = type(kind.__name__, (kind, ShortenTraceback), {"__init__": __init__, "__module__": kind.__module__})
        _PASSING[kind] = passing
    return passing(*error.args)


_PASSING: dict[type, type] = {}


def is_compiled_wrapper(obj) -> bool:
    """Whether ``obj`` is the wrapper ``torch.compile(module)`` returns (``OptimizedModule``): its
    ``__call__`` is compiled, but other methods (``generate``) are the original module's."""
    return isinstance(obj, OptimizedModule)
