"""Low-rank adapters beside frozen Gemm / MatMul / Conv weights (torch-free: onnx and numpy).

For a weight W the loss graph reads W + delta(B @ A) instead of W, with A [r, fan_in] (seeded uniform
+-1/sqrt(fan_in)) and B [out, r] (zeros: the model is unchanged at start). delta reshapes B @ A to W's
layout: as is for Gemm transB=1 ([out, in]), transposed for MatMul and Gemm transB=0 ([in, out]),
reshaped for Conv ([out, in/groups, kh, kw]). Write-back merges W + delta into the weight, so the
deployed file keeps its graph and size (runtime.writeback.merge).
"""
import fnmatch

import numpy as np
from onnx import helper, numpy_helper

from ..runtime.errors import check
from . import onnx_prepare as prep

OPS = ("Gemm", "MatMul", "Conv")
# quantized layers: the weight's input position (QDQ layers read a DequantizeLinear's output at input 1)
QUANTIZED_OPS = {"QLinearConv": 3, "QGemm": 3, "QLinearMatMul": 3, "MatMulInteger": 1}


def _layout(node):
    if node.op_type in ("Conv", "QLinearConv"):
        return "conv"
    transposed = any(a.name == "transB" and a.i for a in node.attribute)
    return "out_in" if node.op_type in ("Gemm", "QGemm") and transposed else "in_out"


def _layer_weight(node, alias, floats, quantized):
    """(weight initializer, is it quantized) of a Gemm/MatMul/Conv layer or a quantized one, else None."""
    if node.op_type in QUANTIZED_OPS and len(node.input) > QUANTIZED_OPS[node.op_type]:
        name = node.input[QUANTIZED_OPS[node.op_type]]
        return (name, True) if name in quantized else None
    if node.op_type not in OPS or len(node.input) < 2:
        return None
    weight = alias.get(node.input[1], node.input[1])
    if weight in floats:
        return weight, False
    q = quantized.get(weight)  # QDQ: input 1 is a DequantizeLinear's output
    return (q.name, True) if q else None


def lora_targets(model, pattern=None):
    """[{weight, shape, layout, quantized}] of the weights of Gemm/MatMul/Conv layers (float, or int8 in QDQ,
    QOperator or dynamic form) matching `pattern` (a glob on the weight's or the node's name; default every such
    layer). An int8 weight's adapters add to its float value, re-quantized at its scale (exporters.quant)."""
    from .quant import quantized_tensors
    alias = prep.aliases(model)
    by_name = {t.name: t for t in model.graph.initializer}
    floats = {n for n, t in by_name.items() if t.data_type == 1}
    qmap = {q.dequantized or q.name: q for q in quantized_tensors(model).values() if q.role == "weight"}
    out = {}
    for node in model.graph.node:
        found = _layer_weight(node, alias, floats, qmap)
        if found is None:
            continue
        weight, quantized = found
        shape, layout = list(by_name[weight].dims), _layout(node)
        if pattern and not any(fnmatch.fnmatchcase(n, pattern) for n in (weight, node.name, node.input[1])):
            continue
        if len(shape) != (4 if layout == "conv" else 2):
            continue
        out.setdefault(weight, {"weight": weight, "shape": shape, "layout": layout, "quantized": quantized})
    check(out, f"--lora: no Gemm/MatMul/Conv weight {'matches ' + repr(pattern) if pattern else 'found'} "
               "(see --list)")
    return list(out.values())


def _sizes(target):
    shape = target["shape"]
    if target["layout"] == "conv":
        return shape[0], int(np.prod(shape[1:]))
    return (shape[0], shape[1]) if target["layout"] == "out_in" else (shape[1], shape[0])


def add_lora(model, targets, rank, seed=0):
    """The model with adapters (A, B initializers; W replaced by W + delta in every node reading it), and the
    targets with their A and B names and rank."""
    check(isinstance(rank, int) and rank >= 1, f"--lora rank must be >= 1, got {rank}")
    model = prep.copy(model)
    graph, rng, alias = model.graph, np.random.default_rng(seed), prep.aliases(model)
    nodes, done = [], []
    for t in targets:
        out, fan_in = _sizes(t)
        check(rank <= min(out, fan_in), f"--lora {rank}: larger than {t['weight']!r} ({out} x {fan_in})")
        a_name, b_name, merged = f"{t['weight']}__lora_A", f"{t['weight']}__lora_B", f"{t['weight']}__lora_merged"
        bound = 1 / np.sqrt(fan_in)
        graph.initializer.extend([
            numpy_helper.from_array(rng.uniform(-bound, bound, (rank, fan_in)).astype(np.float32), a_name),
            numpy_helper.from_array(np.zeros((out, rank), np.float32), b_name)])
        nodes.append(helper.make_node("MatMul", [b_name, a_name], [f"{t['weight']}__lora_BA"]))
        if t["layout"] == "in_out":
            nodes.append(helper.make_node("Transpose", [f"{t['weight']}__lora_BA"], [f"{t['weight']}__lora_d"]))
        else:
            graph.initializer.append(numpy_helper.from_array(np.array(t["shape"], np.int64), f"{t['weight']}__lora_s"))
            nodes.append(helper.make_node("Reshape", [f"{t['weight']}__lora_BA", f"{t['weight']}__lora_s"],
                                          [f"{t['weight']}__lora_d"]))
        if t.get("quantized"):  # W's float value + delta, quantized at W's scale (exporters.quant wires it)
            nodes.append(helper.make_node("Add", [f"{t['weight']}__float", f"{t['weight']}__lora_d"], [merged]))
            done.append(dict(t, A=a_name, B=b_name, rank=rank))
            continue
        nodes.append(helper.make_node("Add", [t["weight"], f"{t['weight']}__lora_d"], [merged]))
        for node in graph.node:
            node.input[:] = [merged if alias.get(i, i) == t["weight"] and node.op_type in OPS else i
                             for i in node.input]
        done.append(dict(t, A=a_name, B=b_name, rank=rank))
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    return model, done
