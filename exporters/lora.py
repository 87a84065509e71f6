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

from ..runtime.errors import EdgezoError, check
from . import onnx_prepare as prep

OPS = ("Gemm", "MatMul", "Conv")


def lora_targets(model, pattern=None):
    """[{weight, shape, layout}] of the float weights of Gemm/MatMul/Conv nodes matching `pattern` (a glob on
    the weight's or the node's name; default every such layer)."""
    alias = prep.aliases(model)
    by_name = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type not in OPS or len(node.input) < 2:
            continue
        weight = alias.get(node.input[1], node.input[1])
        if weight not in by_name or by_name[weight].data_type != 1:
            continue
        shape = list(by_name[weight].dims)
        if pattern and not any(fnmatch.fnmatchcase(n, pattern) for n in (weight, node.name, node.input[1])):
            continue
        if node.op_type == "Conv":
            layout = "conv"
        elif node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            layout = "out_in"
        else:
            layout = "in_out"
        if len(shape) != (4 if layout == "conv" else 2):
            continue
        out.setdefault(weight, {"weight": weight, "shape": shape, "layout": layout})
    if not out and any(t.data_type in (3, 2) for t in model.graph.initializer):  # int8 / uint8 weights
        raise EdgezoError("--lora: the model's weights are quantized; adapters on int8 layers are not supported yet "
                          "(train --scales, --biases or --last-layers K)")
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
        nodes.append(helper.make_node("Add", [t["weight"], f"{t['weight']}__lora_d"], [merged]))
        for node in graph.node:
            node.input[:] = [merged if alias.get(i, i) == t["weight"] and node.op_type in OPS else i
                             for i in node.input]
        done.append(dict(t, A=a_name, B=b_name, rank=rank))
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    return model, done
