"""ONNX files from the wild, made ready for the loss graph (torch-free: onnx and numpy only).

- old opsets are converted to `MIN_OPSET` (onnx.version_converter);
- float weights stored as Constant nodes become initializers of the same name (`constant_weights`);
- Identity aliases of initializers are followed (`aliases`) and shared tensors found (`feeds`);
- a Softmax / LogSoftmax / Sigmoid at the output is found (`output_head`), so the loss reads its logits;
- inputs other than the data are fixed (`fix_inputs`), and a batch axis that is not the first is moved
  first for the loss graph (`batch_first`), so data files are always batch-first.
Nothing here changes the caller's model: each function returns a new one.
"""
import ast
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.engine.graph import subgraph_inputs
from ..runtime.errors import EdgezoError, check

MIN_OPSET = 13  # SoftmaxCrossEntropyLoss needs 12; Softmax's class-axis semantics settle at 13
HEAD_PASS = ("Reshape", "Flatten", "Cast", "Identity", "Squeeze", "Unsqueeze")
HEADS = {"Softmax": "cross_entropy", "LogSoftmax": "cross_entropy", "Sigmoid": "binary_cross_entropy"}
NP_OF = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.INT64: np.int64,
         TensorProto.INT32: np.int32, TensorProto.BOOL: np.bool_}


def sort_nodes(model):
    """The graph's nodes in an order where every input is made before it is read (onnxruntime's fp16 converter
    writes input Casts after their readers; onnxruntime runs such graphs, the ONNX checker refuses them). Nodes
    already in order keep it."""
    graph = model.graph
    made = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producers = {o for node in graph.node for o in node.output}
    pending, order = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in made or i not in producers for i in subgraph_inputs(n))]
        if not ready:  # a cycle: leave the rest for the checker to name
            order += pending
            break
        ids = {id(n) for n in ready}
        order += ready
        pending = [n for n in pending if id(n) not in ids]
        for n in ready:
            made.update(n.output)
    if [id(n) for n in order] != [id(n) for n in graph.node]:
        nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in order]
        del graph.node[:]
        graph.node.extend(nodes)
    return model


def unknown_sizes(model):
    """Axes written with a size <= 0 (Paddle writes -1 for 'any') made dynamic, as ONNX means them: once, on load,
    so that every reader of a shape sees a symbol or nothing there, never a negative size."""
    graph = model.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.ClearField("dim_value")
    return model


def opset(model):
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def copy(model):
    return onnx.ModelProto.FromString(model.SerializeToString())


def upgrade(model, what="the model"):
    """The model at opset >= MIN_OPSET (converted where older)."""
    if opset(model) >= MIN_OPSET:
        return model
    from onnx import version_converter
    try:
        return version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:  # the converter raises RuntimeError / ConvertError with C++ text
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise EdgezoError(f"{what} is at opset {opset(model)} and onnx's version converter cannot bring it to "
                          f"{MIN_OPSET}: {first}") from None


def constant_weights(model):
    """(model, names): float Constant nodes (more than one element) of the main graph become initializers."""
    model = copy(model)
    graph, names, keep = model.graph, [], []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None and value.data_type == TensorProto.FLOAT and int(np.prod(value.dims)) > 1:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            names.append(node.output[0])
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return model, names


def aliases(model):
    """{other name: the initializer it stands for}: Identity outputs (chains followed), and the torch module
    names of weights the torch.export-based exporter stored under generated names (see torch_names)."""
    inits = {t.name for t in model.graph.initializer}
    out, changed = dict(torch_names(model)), True
    while changed:
        changed = False
        for node in model.graph.node:
            if node.op_type == "Identity" and node.output[0] not in out:
                src = out.get(node.input[0], node.input[0] if node.input[0] in inits else None)
                if src is not None:
                    out[node.output[0]] = src
                    changed = True
    return out


def torch_names(model):
    """{"<module path>.weight" / ".bias": initializer} for weights that torch's torch.export-based exporter
    folded into generated names (a Linear's transposed weight becomes "val_12"): read from the node metadata
    it writes (pkg.torch.onnx.name_scopes: the module path), for the weight and bias inputs of Gemm, MatMul,
    Conv and ConvTranspose."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul", "Conv", "ConvTranspose"):
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        try:
            scopes = [s for s in ast.literal_eval(scopes) if s] if scopes else []
        except (ValueError, SyntaxError):
            continue
        if len(scopes) < 2:  # [module path..., op]: an op outside any module has no name to give
            continue
        module = scopes[-2]
        args = re.search(r"args = \((.*)", meta.get("pkg.torch.onnx.fx_node", ""))
        args = [a.strip().rstrip(")") for a in args.group(1).split(",")] if args else []
        for k, (role, name) in enumerate(zip(("weight", "bias"), node.input[1:3]), start=1):
            alias = f"{module}.{role}"
            # only where the traced call read that very parameter (a Conv with a BatchNorm folded in carries
            # the BatchNorm's scope, not its own)
            param = "%p_" + alias.replace(".", "_")
            if name in inits and alias not in inits and "." not in name and k < len(args) and args[k] == param:
                out.setdefault(alias, name)
    return out


def feeds(model):
    """{initializer: [names of the non-Identity nodes that read it, directly or through aliases]}."""
    alias = aliases(model)
    out = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Identity" and node.output[0] in alias:
            continue
        for name in node.input:
            src = alias.get(name, name)
            out.setdefault(src, []).append(node.name or f"{node.op_type}#{i}")
    return out


def subgraph_initializer_uses(model):
    """Names of main-graph initializers (or Constant outputs) read inside If/Loop/Scan bodies."""
    used = set()

    def walk(graph):
        for node in graph.node:
            used.update(node.input)
            for a in node.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(g)
    for node in model.graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                walk(g)
    return used


def output_head(model, output):
    """(loss kind, logits tensor, head op) when `output` is a Softmax/LogSoftmax over its class axis or a
    Sigmoid, possibly followed by Reshape/Flatten/Cast/Identity/Squeeze/Unsqueeze; else None."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name = output
    while name in producer and producer[name].op_type in HEAD_PASS:
        name = producer[name].input[0]
    node = producer.get(name)
    if node is None or node.op_type not in HEADS:
        return None
    if node.op_type != "Sigmoid":
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset(model) >= 13 else 1)
        rank = _rank(model, node.input[0])
        check(rank is not None and axis % rank == rank - 1 or rank is None and axis in (-1, 1),
              f"the model's output {output!r} comes from a {node.op_type} over axis {axis}, not the class axis: "
              "give --loss mse, or an output before it")
    return HEADS[node.op_type], node.input[0], node.op_type


def _rank(model, name):
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference fails on some exotic graphs: the rank is then unknown
        return None
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return None


def parse_fixed(specs, model):
    """--fix-input NAME=VALUE or NAME=FILE.npy -> {name: array of the input's dtype}."""
    inputs = {i.name: i for i in model.graph.input}
    out = {}
    for spec in specs or ():
        check("=" in spec, f"--fix-input {spec!r}: give NAME=VALUE or NAME=FILE.npy")
        name, value = spec.split("=", 1)
        check(name in inputs, f"--fix-input {name!r}: the model has no input of that name ({list(inputs)})")
        dtype = NP_OF.get(inputs[name].type.tensor_type.elem_type, np.float32)
        if value.endswith(".npy"):
            check(Path(value).is_file(), f"--fix-input {name}={value}: no such file")
            try:
                out[name] = np.load(value, allow_pickle=False).astype(dtype)
            except (ValueError, OSError) as e:
                raise EdgezoError(f"--fix-input {name}={value}: not a readable .npy ({e})") from None
        else:
            try:
                out[name] = np.array(float(value)).astype(dtype)
            except ValueError:
                raise EdgezoError(f"--fix-input {name}={value!r}: not a number (or give a .npy file)") from None
    return out


def dims(value):
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in
            value.type.tensor_type.shape.dim]


def batch_axes(model, data_inputs, given=None):
    """{graph input or output name: its batch axis or None}. The batch symbol is the data input's first
    symbolic dimension (or the --batch-axis given for it); every value carrying that symbol has its axis."""
    given = dict(given or {})
    first = data_inputs[0]
    shape = dims(first)
    if first.name in given:
        axis = given[first.name]
        check(0 <= axis < len(shape), f"--batch-axis {first.name}={axis}: the input has {len(shape)} axes")
    else:
        axis = next((k for k, d in enumerate(shape) if isinstance(d, str) or d is None), 0 if shape else None)
    check(axis is not None, f"graph input {first.name!r} has no axes: it cannot carry a batch")
    symbol = shape[axis] if isinstance(shape[axis], str) else None
    out = {}
    for value in list(data_inputs) + list(model.graph.output):
        if value.name in given:
            out[value.name] = given[value.name]
            check(0 <= given[value.name] < len(dims(value)), f"--batch-axis {value.name}={given[value.name]}: "
                                                             f"it has {len(dims(value))} axes")
        elif value is first:
            out[value.name] = axis
        else:
            d = dims(value)
            hits = [k for k, s in enumerate(d) if symbol is not None and s == symbol]
            out[value.name] = hits[0] if hits else (0 if d and symbol is None and axis == 0 else None)
    unknown = set(given) - set(out)
    if unknown:
        raise EdgezoError(f"--batch-axis {sorted(unknown)[0]}: not an input or output of the model")
    return out


def parse_batch_axes(specs):
    out = {}
    for spec in specs or ():
        name, _, axis = spec.partition("=")
        check(axis.lstrip("-").isdigit(), f"--batch-axis {spec!r}: give NAME=AXIS (an integer)")
        out[name] = int(axis)
    return out


def fix_inputs(model, fixed, data_input, data_axis):
    """Replace each fixed graph input by a constant, broadcast along the batch where the input has one (its
    shape has the data input's batch symbol)."""
    model = copy(model)
    graph = model.graph
    symbol = dims(data_input)[data_axis]
    nodes = []
    for name, value in fixed.items():
        spec = next(i for i in graph.input if i.name == name)
        shape = dims(spec)
        axis = next((k for k, s in enumerate(shape) if isinstance(symbol, str) and s == symbol), None)
        graph.input.remove(spec)
        if axis is None:
            want = [s if isinstance(s, int) else None for s in shape]
            if value.ndim == 0 and want:
                value = np.broadcast_to(value, [s or 1 for s in want]).copy()
            check(value.ndim == len(want) and all(w is None or w == s for w, s in zip(want, value.shape)),
                  f"--fix-input {name}: value of shape {list(value.shape)}, the input wants {shape}")
            graph.initializer.append(numpy_helper.from_array(value, name))
            continue
        one = [1 if k == axis else (s if isinstance(s, int) else 1) for k, s in enumerate(shape)]
        if value.ndim == len(shape) - 1:
            value = np.expand_dims(value, axis)
        value = np.broadcast_to(value, one).copy() if value.ndim == 0 else value
        check(value.ndim == len(shape) and value.shape[axis] == 1 and all(
            isinstance(s, str) or s is None or s == v for k, (s, v) in enumerate(zip(shape, value.shape)) if k != axis),
              f"--fix-input {name}: value of shape {list(value.shape)} does not fit {shape} (give it without the "
              f"batch axis {axis}, or with size 1 there)")
        base, shp, n, full = f"{name}__fixed", f"{name}__datashape", f"{name}__n", f"{name}__shape"
        graph.initializer.extend([numpy_helper.from_array(value, base),
                                  numpy_helper.from_array(np.array([data_axis], np.int64), f"{name}__axis"),
                                  numpy_helper.from_array(np.array(value.shape, np.int64), f"{name}__ones")])
        nodes += [helper.make_node("Shape", [data_input.name], [shp]),
                  helper.make_node("Gather", [shp, f"{name}__axis"], [n]),
                  helper.make_node("ScatterElements", [f"{name}__ones", f"{name}__axisk", n], [full]),
                  helper.make_node("Expand", [base, full], [name])]
        graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), f"{name}__axisk"))
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    return model


def batch_first(model, axes):
    """Inputs whose batch axis is k > 0 take batch-first data (a Transpose inside the graph moves it to k);
    outputs with the batch on k > 0 get a batch-first copy. Returns (model, {output: batch-first name})."""
    model = copy(model)
    graph = model.graph
    front, moved = [], {}
    for value in graph.input:
        k = axes.get(value.name)
        if not k:
            continue
        inner = f"{value.name}__model"
        for node in graph.node:
            node.input[:] = [inner if i == value.name else i for i in node.input]
        shape = value.type.tensor_type.shape.dim
        perm = [i + 1 for i in range(len(shape) - 1)]
        perm.insert(k, 0)
        order = [shape[k]] + [d for i, d in enumerate(shape) if i != k]
        dims_copy = [onnx.TensorShapeProto.Dimension() for _ in order]
        for new, old in zip(dims_copy, order):
            new.CopyFrom(old)
        del shape[:]
        shape.extend(dims_copy)
        front.append(helper.make_node("Transpose", [value.name], [inner], perm=perm))
    back = []
    for value in graph.output:
        k = axes.get(value.name)
        if k:
            rank = len(value.type.tensor_type.shape.dim)
            moved[value.name] = f"{value.name}__batch_first"
            back.append(helper.make_node("Transpose", [value.name], [moved[value.name]],
                                         perm=[k] + [i for i in range(rank) if i != k]))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(front + nodes + back)
    return model, moved
