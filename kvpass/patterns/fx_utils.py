"""Reading Dynamo FX nodes: one name per operation whatever its spelling (function, method, operator),
argument lookup by position or keyword, and the fake tensor a node produces."""
from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

# One canonical name for the functions Dynamo leaves in a graph; methods keep their own name.
_FUNCTION_NAMES = {
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul",
    torch.softmax: "softmax", F.softmax: "softmax", torch.Tensor.softmax: "softmax",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
    operator.add: "add", torch.add: "add",
    F.dropout: "dropout", torch.dropout: "dropout",
    torch.transpose: "transpose", torch.cat: "cat", torch.repeat_interleave: "repeat_interleave",
    F.scaled_dot_product_attention: "sdpa", torch._C._nn.scaled_dot_product_attention: "sdpa",
    operator.getitem: "getitem", operator.setitem: "setitem",
    torch.index_copy: "index_copy", torch.Tensor.index_copy_: "index_copy_",
    torch.Tensor.index_put_: "index_put_", torch.index_put: "index_put",
}


def op_name(node: Any) -> str | None:
    """'matmul', 'softmax', 'transpose', ... for a call node; None for anything else."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return _FUNCTION_NAMES.get(node.target, getattr(node.target, "__name__", str(node.target)))
    return None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given positionally at ``index`` (counting self for methods) or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def fake(node: Any) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for a node, if it is a tensor."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def rank(node: Any) -> int | None:
    value = fake(node)
    return value.dim() if value is not None else None


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def normalise_dim(dim: Any, ndim: int | None) -> Any:
    if isinstance(dim, int) and ndim is not None and dim < 0:
        return dim + ndim
    return dim


def module_path(node: fx.Node) -> str:
    """'model.layers.3.self_attn' from Dynamo's nn_module_stack, or '' when not recorded."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return qualified_name(list(stack.values())[-1][0])


# The root a Dynamo source names a module from: the compiled function's local (L['self'], L['args'][0] when
# the module is reached through *args, as with model.compile or HF's wrapped forward), a global, or self.
_SOURCE_ROOT = re.compile(r"^(?:[LG]\['[^']*'\](?:\[\d+\])*|self)")


def qualified_name(source: str) -> str:
    """A module's dotted path from its Dynamo source name: L['self'].model.layers[3], L['args'][0].model,
    L['self']._modules['model']._modules['layers']._modules['3'] -> 'model.layers.3' (the root dropped)."""
    path = _SOURCE_ROOT.sub("", source, count=1)
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.lstrip(".")
