"""Trace a model into a small data-flow graph of layer calls and ops, for filter-group discovery.

Two tracers give the same graph:
- torch.fx (symbolic): exact functional targets, no backward needed. It fails on
  forwards with data-dependent Python (`int()` of a traced size, `if x.sum() > 0`).
- the autograd graph of one forward (as Torch-Pruning does): forward hooks
  record each layer call (its input and output autograd nodes), the ops in
  between are the autograd nodes of the forward. It follows any forward that
  runs, but cannot see ops autograd does not record (an add of a constant
  tensor looks like an add of a scalar), so fx is tried first.

Nodes: kind "input" (a model input), "param" (a parameter or buffer read
outside its layer), "module" (a call of a structural layer: conv, linear,
norm; `target` is its module name), "op" (`target` is a canonical op name
such as "relu", "add", "permute"; `info` holds dims where they matter),
"output". Per-channel activation modules (nn.ReLU, ...) become op nodes.
"""
from __future__ import annotations

import inspect
import operator
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..nn.views import training_mode

# Layers that stay one node; everything else is seen through (fx) or as autograd ops.
STRUCTURAL = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)

# Modules that are one op: canonical name of each.
_MODULE_OPS = [
    (nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.GELU, "gelu"), (nn.SiLU, "silu"), (nn.LeakyReLU, "leaky_relu"),
    (nn.ELU, "elu"), (nn.Hardswish, "hardswish"), (nn.Hardsigmoid, "hardsigmoid"), (nn.Hardtanh, "hardtanh"),
    (nn.Mish, "mish"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.Dropout2d, "dropout2d"),
    (nn.Dropout, "dropout"), (nn.Identity, "identity"), (nn.MaxPool2d, "max_pool2d"), (nn.AvgPool2d, "avg_pool2d"),
    (nn.AdaptiveAvgPool2d, "adaptive_avg_pool2d"), (nn.AdaptiveMaxPool2d, "adaptive_max_pool2d"),
    (nn.Flatten, "reshape"), (nn.Unflatten, "reshape"), (nn.Softmax, "softmax"),
]
_FUNCTION_OPS = {
    F.relu: "relu", F.relu_: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6", F.gelu: "gelu",
    F.silu: "silu", F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu", F.elu: "elu", F.elu_: "elu",
    F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.hardtanh: "hardtanh", F.mish: "mish",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.dropout: "dropout",
    F.dropout2d: "dropout2d", F.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d",
    F.adaptive_avg_pool2d: "adaptive_avg_pool2d", F.adaptive_max_pool2d: "adaptive_max_pool2d",
    operator.add: "add", torch.add: "add", operator.iadd: "add", operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.imul: "mul", operator.truediv: "div", torch.div: "div",
    torch.cat: "cat", torch.concat: "cat", torch.stack: "cat", torch.flatten: "reshape", torch.reshape: "reshape",
    torch.permute: "permute", torch.transpose: "transpose", torch.mean: "mean", torch.softmax: "softmax",
    F.softmax: "softmax", torch.chunk: "split", torch.split: "split", F.layer_norm: "layer_norm",
    F.batch_norm: "batch_norm", F.conv2d: "conv2d", F.linear: "linear",
}
_METHOD_OPS = {
    "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh", "tanh_": "tanh",
    "add": "add", "add_": "add", "sub": "sub", "mul": "mul", "mul_": "mul", "div": "div",
    "view": "reshape", "reshape": "reshape", "flatten": "reshape", "unflatten": "reshape", "view_as": "reshape",
    "permute": "permute", "transpose": "transpose", "contiguous": "identity", "clone": "identity",
    "mean": "mean", "softmax": "softmax", "chunk": "split", "split": "split",
}
# Autograd node class (without "Backward<k>") -> canonical op name.
_AUTOGRAD_OPS = {
    "Relu": "relu", "Hardtanh": "hardtanh", "Gelu": "gelu", "Silu": "silu", "LeakyRelu": "leaky_relu", "Elu": "elu",
    "Hardswish": "hardswish", "Hardsigmoid": "hardsigmoid", "Mish": "mish", "Sigmoid": "sigmoid", "Tanh": "tanh",
    "MaxPool2DWithIndices": "max_pool2d", "AvgPool2D": "avg_pool2d", "AdaptiveAvgPool2D": "adaptive_avg_pool2d",
    "AdaptiveMaxPool2D": "adaptive_max_pool2d", "Add": "add", "Sub": "sub", "Rsub": "sub", "Mul": "mul", "Div": "div",
    "Cat": "cat", "Stack": "cat", "View": "reshape", "UnsafeView": "reshape", "ReshapeAlias": "reshape",
    "Permute": "permute", "Transpose": "transpose", "Mean": "mean", "Softmax": "softmax", "Split": "split",
    "SplitWithSizes": "split", "Unbind": "split", "Clone": "identity", "NativeLayerNorm": "layer_norm",
    "NativeBatchNorm": "batch_norm", "Convolution": "conv2d", "Addmm": "linear", "Mm": "linear",
}


@dataclass(eq=False)
class FlowNode:
    kind: str                       # "input", "param", "module", "op", "output"
    target: str                     # module name, op name or param name
    inputs: list = field(default_factory=list)  # FlowNode (a node may appear once per tensor argument)
    users: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    shape: Optional[tuple] = None   # the output's shape, where known

    @property
    def ndim(self) -> Optional[int]:
        return None if self.shape is None else len(self.shape)


@dataclass
class FlowGraph:
    nodes: list                     # in execution order
    tracer: str                     # "torch.fx" or "autograd"
    calls: dict                     # module name -> times called
    read_directly: set              # module names whose parameters are read outside their own call


def _link(nodes: list) -> None:
    for node in nodes:
        for i in dict.fromkeys(node.inputs):  # a node using x twice (x * x) is one user of x
            i.users.append(node)


def _module_op(m: nn.Module) -> Optional[str]:
    for kind, name in _MODULE_OPS:
        if type(m) is kind:
            return name
    return None


# ---------------------------------------------------------------- torch.fx ----
class _Tracer(fx.Tracer):
    # Structural layers (Loft layers and user subclasses included) are one opaque call each.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, STRUCTURAL) or super().is_leaf_module(m, qualname)


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced graph and records each tensor-valued node's shape, and which nodes return several tensors
    (a tuple or list: chunk, max with a dim, a module such as nn.MultiheadAttention)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # the model's own error message is the useful one
        self.shapes: dict[fx.Node, tuple] = {}
        self.several: set[fx.Node] = set()

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, Tensor):
            self.shapes[n] = tuple(result.shape)
        elif isinstance(result, (tuple, list)) and any(isinstance(t, Tensor) for t in result):
            self.several.add(n)
        return result


def _arg(node: fx.Node, index: int, key: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(key, default)


def _fx_info(node: fx.Node, op: str, modules: dict) -> dict:
    if op == "div" and node.args and not isinstance(node.args[0], fx.Node):
        return {"keeps_zero": False}  # c / x: the tensor is the divisor
    if op == "hardtanh":
        if node.op == "call_module":
            m = modules[node.target]
            low, high = m.min_val, m.max_val
        else:
            low, high = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
        return {"keeps_zero": isinstance(low, (int, float)) and isinstance(high, (int, float)) and low <= 0 <= high}
    if op == "permute":
        dims = node.args[1:] if node.op == "call_method" else (_arg(node, 1, "dims"),)
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        return {"dims": tuple(dims)}
    if op == "transpose":
        return {"dims": (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))}
    if op == "mean":
        dim = _arg(node, 1, "dim")
        return {"dims": None if dim is None else tuple(dim) if isinstance(dim, (list, tuple)) else (dim,),
                "keepdim": bool(_arg(node, 2, "keepdim", False))}
    return {}


def fx_graph(model: nn.Module, args: tuple, run) -> FlowGraph:
    """Trace with torch.fx; `run(fn)` runs fn() with the model in a safe mode (see groups._run_safely)."""
    with training_mode(model, False):  # trace the forward that runs: eval-mode branches (no dropout masks)
        graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    recorder = _ShapeRecorder(gm)
    run(lambda: recorder.run(*args))
    modules = dict(model.named_modules())
    nodes, mapped, calls, read_directly = [], {}, {}, set()
    for n in graph.nodes:
        if n.op not in ("placeholder", "output", "get_attr") and n not in recorder.shapes and \
                n not in recorder.several:
            continue  # holds no tensor: a size query, a shape attribute, ...
        if n.op == "placeholder":
            node = FlowNode("input", n.target)
        elif n.op == "get_attr":
            read_directly.add(n.target.rpartition(".")[0])
            node = FlowNode("param", n.target)
        elif n.op == "output":
            node = FlowNode("output", "output")
        elif n.op == "call_module":
            m = modules[n.target]
            op = None if isinstance(m, STRUCTURAL) else _module_op(m)
            if op is None:
                calls[n.target] = calls.get(n.target, 0) + 1
                node = FlowNode("module", n.target)
            else:
                node = FlowNode("op", op, info=_fx_info(n, op, modules))
        else:
            if n.op == "call_function":
                op = _FUNCTION_OPS.get(n.target, getattr(n.target, "__name__", str(n.target)))
            else:
                op = _METHOD_OPS.get(n.target, n.target)
            node = FlowNode("op", op, info=_fx_info(n, op, modules))
        node.shape = recorder.shapes.get(n)
        node.inputs = [mapped[a] for a in _flat_inputs(n) if a in mapped]
        mapped[n] = node
        nodes.append(node)
        target = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if target in mapped and _in_place(n, modules):
            mapped[target] = node  # later reads of the mutated tensor see this op's result
    _link(nodes)
    return FlowGraph(nodes, "torch.fx", calls, read_directly)


_IN_PLACE_FUNCTIONS = {F.relu_, torch.relu_, F.leaky_relu_, F.elu_, operator.iadd, operator.isub, operator.imul,
                       operator.itruediv}


def _in_place(n: fx.Node, modules: dict) -> bool:
    """Whether the op writes its first argument (x.relu_(), F.relu(x, inplace=True), x += y, nn.ReLU(inplace=True))."""
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.endswith("__")
    if n.op == "call_function":
        if n.target in _IN_PLACE_FUNCTIONS or n.kwargs.get("inplace") is True:
            return True
        try:  # F.relu(x, True), F.dropout(x, 0.1, False, True): `inplace` given by position
            return inspect.signature(n.target).bind(*n.args, **n.kwargs).arguments.get("inplace") is True
        except (TypeError, ValueError):  # builtins without a signature, or arguments it does not bind
            return False
    if n.op == "call_module":
        return getattr(modules[n.target], "inplace", False) is True
    return False


def _flat_inputs(n: fx.Node) -> list:
    """Tensor inputs in argument order, repeated arguments kept (x * x has two)."""
    out = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: out.append(a))
    return out


# ---------------------------------------------------------------- autograd ----
_NODE_NAME = re.compile(r"Backward\d*$")


def _signed(d: int) -> int:
    return d - (1 << 64) if d >= (1 << 63) else d  # autograd stores negative dims as uint64


def _autograd_info(fn, op: str) -> dict:
    if op == "hardtanh":
        low, high = getattr(fn, "_saved_min_val", None), getattr(fn, "_saved_max_val", None)
        return {"keeps_zero": low is not None and high is not None and float(low) <= 0 <= float(high)}
    if op == "permute":
        return {"dims": tuple(_signed(d) for d in fn._saved_dims)}
    if op == "transpose":
        return {"dims": (_signed(fn._saved_dim0), _signed(fn._saved_dim1))}
    if op == "mean":
        dims = getattr(fn, "_saved_dim", None)
        return {"dims": None if dims is None else tuple(_signed(d) for d in dims),
                "keepdim": bool(getattr(fn, "_saved_keepdim", False))}
    return {}


def _output_shape(fn) -> Optional[tuple]:
    """The shape of an autograd node's (first) forward output, where torch exposes it."""
    try:
        return tuple(fn._input_metadata[0].shape)  # the gradient it receives has its output's shape
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return None


def _constant_operand(fn) -> bool:
    """Whether a binary op's operand without grad is a tensor of more than one element (not a scalar)."""
    saved = [getattr(fn, a, None) for a in ("_saved_other", "_saved_self")]
    return any(isinstance(t, Tensor) and t.numel() > 1 and not t.requires_grad for t in saved)


def autograd_graph(model: nn.Module, args: tuple, run) -> FlowGraph:
    """Trace one forward (grad enabled) through forward hooks and the autograd graph of its output."""
    calls_seen: list[tuple[str, object, object, tuple]] = []  # (name, input grad_fn, output grad_fn, shape)

    def hook(name):
        def record(m, inputs, output):
            if isinstance(output, Tensor):
                first = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
                calls_seen.append((name, None if first is None else first.grad_fn, output.grad_fn,
                                   tuple(output.shape)))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if isinstance(m, STRUCTURAL)]
    # Inputs, and buffers read outside the layers, get grad for the trace so that an add of either shows up
    # as an operand (an operand without grad looks like a Python scalar).
    args = tuple(a.detach().requires_grad_(True) if a.is_floating_point() else a for a in args)
    leaves = {id(a): f"input {i}" for i, a in enumerate(args)}
    loose = _loose_buffers(model)
    for name, b in loose:
        leaves.setdefault(id(b), name)
    lifted = [b for _, b in loose if b.is_floating_point() and not b.requires_grad]
    outputs = []
    try:
        for b in lifted:
            b.requires_grad_(True)
        with warnings.catch_warnings():  # the forward's own float()/item() would warn about the grad we added
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
            run(lambda: outputs.append(model(*args)), grad=True)
    finally:
        for b in lifted:
            b.requires_grad_(False)
        for h in handles:
            h.remove()
    roots = [t.grad_fn for t in _tensors(outputs[0]) if t.grad_fn is not None]
    if not roots:
        raise ValueError("the model's output does not depend on its parameters through autograd (is the forward "
                         "under torch.no_grad or detached?)")
    param_names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    module_of_output, module_input, internal = {}, {}, {}
    calls: dict[str, int] = {}
    for name, fn_in, fn_out, shape in calls_seen:
        calls[name] = calls.get(name, 0) + 1
        if fn_out is None:
            continue
        module_of_output[fn_out] = FlowNode("module", name, shape=shape)
        stack = [fn_out]
        while stack:  # the layer's own autograd nodes: from its output back to its input
            fn = stack.pop()
            if fn is None or fn is fn_in or fn in internal or type(fn).__name__ == "AccumulateGrad":
                continue
            internal[fn] = name
            stack += [f for f, _ in fn.next_functions]
        module_input[fn_out] = fn_in
    nodes, mapped, read_directly = {}, {}, set()

    def node_of(fn) -> FlowNode:
        if fn in mapped:
            return mapped[fn]
        if fn in module_of_output:
            node = module_of_output[fn]
        elif type(fn).__name__ == "AccumulateGrad":
            var = id(fn.variable)
            if var in param_names or var in leaves and not leaves[var].startswith("input "):
                name = param_names.get(var) or leaves[var]
                read_directly.add(name.rpartition(".")[0])
                node = FlowNode("param", name)
            else:
                node = FlowNode("input", leaves.get(var, "leaf"))
        else:
            op_name = _AUTOGRAD_OPS.get(_NODE_NAME.sub("", type(fn).__name__), type(fn).__name__)
            node = FlowNode("op", op_name, info=_autograd_info(fn, op_name))
            node.shape = _output_shape(fn)
            if op_name in ("add", "sub", "mul", "div") and any(f is None for f, _ in fn.next_functions) and \
                    (op_name in ("add", "sub") or not _constant_operand(fn)):
                node.info["scalar_operand"] = True
        mapped[fn] = node
        return node

    order, stack, seen = [], list(roots), set()
    while stack:  # iterative DFS post-order: inputs before users
        fn = stack[-1]
        if fn in seen:
            stack.pop()
            if fn not in order:
                order.append(fn)
            continue
        seen.add(fn)
        ins = [module_input[fn]] if fn in module_of_output else \
            [f for f, _ in fn.next_functions] if fn not in internal else []
        stack += [f for f in ins if f is not None and f not in seen]
    for fn in order:
        node = node_of(fn)
        if fn in module_of_output:
            fin = module_input[fn]
            node.inputs = [] if fin is None else [node_of(fin)]
        elif node.kind == "op":
            node.inputs = [node_of(f) for f, _ in fn.next_functions if f is not None]
            if any(f is None for f, _ in fn.next_functions) and not node.info.get("scalar_operand"):
                node.inputs.append(FlowNode("input", "constant"))  # a tensor without grad takes part
        nodes[fn] = node
    out = FlowNode("output", "output", inputs=[mapped[r] for r in roots])
    all_nodes = list(nodes.values()) + [out]
    _link(all_nodes)
    return FlowGraph(all_nodes, "autograd", calls, read_directly)


def _loose_buffers(model: nn.Module) -> list:
    """(name, buffer) of the buffers of non-structural modules: those a forward may read directly."""
    return [(f"{mod_name}.{name}" if mod_name else name, b) for mod_name, m in model.named_modules()
            if not isinstance(m, STRUCTURAL) for name, b in m.named_buffers(recurse=False)]


def _tensors(value) -> list:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []
