"""Reading loss.onnx into the engine's layers: which part is frozen, which op owns which trainable tensor, and
the numpy layer, perturbed-output kernel (direct.py) or opaque op each node becomes."""
import numpy as np
import onnx
from onnx import numpy_helper

from .direct import make_direct
from .graph import _ROLES, Subgraphs, _ancestors, _attrs, _kinds, _tainted, subgraph_inputs
from .layers import (BatchNorm, Bias, Conv, Flatten, Gemm, LeakyRelu, MaxPool, Opaque, Relu, SpatialMean, Sum,
                     Unsupported, scores_name)


def _first_inputs(ops, graph, kinds):
    """The activation inputs of `ops` (in graph order) that do not depend on an earlier one of them."""
    starts, reached = [], set()
    order = {id(node): k for k, node in enumerate(graph.node)}
    for op in sorted({id(o): o for o in ops}.values(), key=lambda o: order[id(o)]):
        for name in op.input:
            if kinds.get(name) == "data" and name not in reached:
                starts.append(name)
                reached.add(name)
                for node in graph.node:
                    if any(n in reached for n in subgraph_inputs(node)):
                        reached.update(node.output)
    return starts


def read_engine(cls, model_path, manifest, propagate=True, memory_mb=256, threads=None, device="cpu"):
    """The engine for loss.onnx at model_path; raises Unsupported where an op or pattern is not handled."""
    model = onnx.load(str(model_path))
    if manifest["loss"]["kind"] not in ("mse", "cross_entropy", "binary_cross_entropy") and \
            not manifest["loss"].get("per_sample"):
        raise Unsupported(f"loss kind {manifest['loss']['kind']!r} without a per-sample output (export the loss "
                          "with reduction 'none', one value per sample)")
    if len(manifest["inputs"]) != 1 or len(manifest["targets"]) != 1:
        raise Unsupported("more than one input or target")
    graph = model.graph
    entries = {e["name"]: e for e in manifest["trainable"]}
    const = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            attrs = _attrs(node)
            const[node.output[0]] = numpy_helper.to_array(attrs["value"]) if "value" in attrs \
                else np.array(attrs.get("value_ints"))
    kinds = _kinds(graph, const, manifest["params_input"], manifest["inputs"][0]["name"])
    output = scores_name(manifest)
    nodes = _ancestors([n for n in graph.node if kinds[n.output[0]] == "data"], kinds, output)
    # the frozen part (data nodes that no trainable tensor reaches) runs once per step in onnxruntime,
    # any op; only the nodes downstream of a trainable tensor become numpy layers
    tainted = _tainted(graph, manifest["params_input"])
    frozen = [node for node in nodes if node.output[0] not in tainted]
    nodes = [node for node in nodes if node.output[0] in tainted]
    folded = sorted({n for node in nodes for n in node.input[1:]
                     if n and kinds.get(n) == "static" and n not in const and n not in entries})
    # one run at a dummy batch of 2 (zeros): the folded tensors' values and every activation's shape
    subgraphs = Subgraphs(model, manifest, threads, device=device, keep=2)
    outs = [node.output[0] for node in nodes]
    frozen_in = sorted({n for node in nodes for n in node.input if kinds.get(n) == "data"} - set(outs)
                       - {manifest["inputs"][0]["name"]})
    probe = subgraphs.run(folded + outs + frozen_in, np.zeros(manifest["num_params"], np.float32),
                          np.zeros([2] + list(manifest["inputs"][0]["shape"][1:]), np.float32))
    const.update({n: probe[n] for n in folded})
    param_deps = {name: {name} for name in entries}  # tensor -> the trainable tensors it is computed from
    for node in graph.node:
        deps = set().union(*(param_deps.get(n, ()) for n in node.input))
        if deps and kinds.get(node.output[0]) == "param":
            param_deps.update({out: deps for out in node.output})
    used, layers = set(), []
    shapes = {name: value.shape for name, value in probe.items()}
    shapes[manifest["inputs"][0]["name"]] = (2, *manifest["inputs"][0]["shape"][1:])
    producer = {o: node for node in graph.node for o in node.output}
    readers = {}  # trainable tensor -> the ops that read it (directly or through Identity, Transpose, ...)
    for node in nodes:
        for name in {t for n in node.input for t in param_deps.get(n, ())}:
            readers.setdefault(name, []).append(node)
    for node in nodes:  # an op without numpy code becomes Opaque: only the tensors it affects go naive
        data = list(dict.fromkeys(n for n in subgraph_inputs(node) if kinds.get(n) == "data"))
        reads = sorted({t for n in node.input for t in param_deps.get(n, ())})
        shared = [t for t in reads if len(readers[t]) > 1]
        if shared:  # the generic path from the inputs of every op that reads them
            owned = [t for t in reads if t not in used]
            layer = Opaque(node, {}, {f"t{i}": entries[name] for i, name in enumerate(owned)}, data)
            layer.starts = _first_inputs([r for t in owned for r in readers[t]], graph, kinds)
            layer.reason = f"{shared[0]!r} is read by {len(readers[shared[0]])} ops"
            used.update(owned)
            layers.append(layer)
            continue
        before = set(used)
        try:
            layer = _layer(node, const, entries, used, kinds)
            if isinstance(layer, Flatten) and probe[layer.output].shape != (2, probe[layer.output][0].size):
                raise Unsupported(f"{node.op_type} to shape {list(probe[layer.output].shape)} (only [batch, -1])")
            if isinstance(layer, (Gemm, Bias)) and probe[layer.output].ndim != 2:
                raise Unsupported(f"{node.op_type} on activations of rank {probe[layer.output].ndim}")
        except Unsupported as e:
            used.intersection_update(before)
            try:  # its perturbed output computed directly, then the rest of the graph on the copies
                layer = make_direct(node, entries, used, kinds, shapes, producer)
            except Unsupported:  # the generic path: onnxruntime from its inputs, per perturbation
                layer = Opaque(node, {}, {f"t{i}": entries[name] for i, name in enumerate(reads)}, data)
                layer.starts = data
                used.update(reads)
            layer.reason = str(e)
        layers.append(layer)
    if set(entries) - used:
        raise Unsupported(f"trainable tensors outside the graph's data path: {sorted(set(entries) - used)[:3]}")
    convs = [layer for layer in layers if isinstance(layer, Conv)]
    for layer in convs:
        layer.make_session(threads, device)
    # Convolutions run much faster in onnxruntime; for Gemm-only graphs numpy's forward is faster
    # than a session call (measured: SARCOS MLP 3.4 vs 4.3 ms per step)
    base = subgraphs if convs or frozen or any(isinstance(layer, Opaque) for layer in layers) else None
    widest = max(probe[layer.output].nbytes // 2 for layer in layers)
    engine = cls(layers, manifest, propagate, memory_mb, base, widest)
    engine.kinds, engine.cuts = kinds, subgraphs  # cuts: the cut-subgraph factory even where the base is numpy
    rng = np.random.default_rng(0)
    a0 = rng.standard_normal([3] + list(manifest["inputs"][0]["shape"][1:])).astype(np.float32)
    engine.check_stacking(a0)
    engine.check_loss(subgraphs, probe[output] + rng.standard_normal(probe[output].shape).astype(np.float32), rng)
    subgraphs.sessions.clear()  # the build's sessions (each holds the frozen weights) are not the steps'
    return engine


def _layer(node, const, entries, used, kinds):
    op, attrs = node.op_type, _attrs(node)
    data = [n for n in node.input if kinds.get(n) == "data"]
    if op == "Add" and len(data) == 2:
        return Sum(node, {}, {}, data)
    if len(data) != 1 or node.input[0] != data[0]:
        raise Unsupported(f"{op} {node.output[0]!r} with activation inputs {list(node.input)}")
    roles = _ROLES.get(op, ("input",))
    params, consts = {}, {}
    for role, name in zip(roles[1:], node.input[1:]):
        if name in entries:
            if name in used:
                raise Unsupported(f"tensor {name!r} is used twice")
            params[role] = entries[name]
            used.add(name)
        elif name in const:
            consts[role] = const[name].astype(np.float32)
        else:
            raise Unsupported(f"{op} input {name!r} is neither a parameter nor a constant")
    if op == "Gemm":
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise Unsupported("Gemm with transA, alpha or beta")
        layer = Gemm(node, consts, params, data)
        layer.trans_b = bool(attrs.get("transB", 0))
    elif op == "MatMul":
        layer = Gemm(node, consts, params, data)
        layer.trans_b = False
    elif op == "Conv":
        if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise Unsupported("grouped or dilated Conv")
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise Unsupported("Conv auto_pad")
        layer = Conv(node, consts, params, data)
        layer.stride = tuple(attrs.get("strides", [1, 1]))
        layer.pads = tuple(attrs.get("pads", [0, 0, 0, 0]))
        weight = params.get("weight", {}).get("shape") or consts["weight"].shape
        layer.kernel = tuple(attrs.get("kernel_shape", weight[2:]))
    elif op == "Relu":
        layer = Relu(node, consts, params, data)
    elif op == "LeakyRelu":
        layer = LeakyRelu(node, consts, params, data)
        layer.alpha = np.float32(attrs.get("alpha", 0.01))
    elif op == "MaxPool":
        if any(attrs.get("pads", [0] * 4)) or attrs.get("ceil_mode", 0) or \
                any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise Unsupported("MaxPool with padding, ceil mode or dilation")
        layer = MaxPool(node, consts, params, data)
        layer.kernel, layer.stride = tuple(attrs["kernel_shape"]), tuple(attrs.get("strides", [1, 1]))
    elif op == "Add" and ("bias" in params or "bias" in consts):
        layer = Bias(node, consts, params, data)
    elif op == "BatchNormalization":
        if attrs.get("training_mode", 0):
            raise Unsupported("BatchNormalization in training mode")
        layer = BatchNorm(node, consts, params, data)
        layer.eps = np.float32(attrs.get("epsilon", 1e-5))
    elif op in ("Flatten", "Reshape"):
        if op == "Flatten" and attrs.get("axis", 1) != 1:
            raise Unsupported("Flatten with axis != 1")
        layer = Flatten(node, {}, {}, data)
    elif op in ("ReduceMean", "GlobalAveragePool"):
        axes = attrs.get("axes") if len(node.input) < 2 else const.get(node.input[1])
        if op == "ReduceMean" and (axes is None or sorted(int(a) % 4 for a in np.ravel(axes)) != [2, 3]):
            raise Unsupported("ReduceMean over axes other than the two spatial ones")
        layer = SpatialMean(node, {}, {}, data)
        layer.keepdims = op == "GlobalAveragePool" or bool(attrs.get("keepdims", 1))
    else:
        raise Unsupported(f"op {op}")
    return layer
