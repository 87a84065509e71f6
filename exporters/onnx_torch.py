"""A small ONNX-to-torch interpreter: an artifact's loss.onnx as a trainable torch module, so first-order
baselines (train-torch, the profiler) work for imported models, which have no reference.pt2.

`OnnxModule(artifact_dir)` holds one torch Parameter per trainable tensor (named as in the manifest) and
runs the graph from the inputs to the tensor the loss reads (the logits before a Softmax/Sigmoid head,
else the model output), so the same loss definition applies as in every edgezo path. onnx2torch would
serve, but it imports torchvision, whose wheels do not import with the CPU torch here. An op outside
OPS is a clear error naming it.
"""
import math
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from ..runtime.errors import EdgezoError
from ..runtime.manifest import read

DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 11: torch.float64, 10: torch.float16}


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _axes(node, ins, a, at=1):
    if len(ins) > at and ins[at] is not None:
        return [int(v) for v in ins[at].reshape(-1).tolist()]
    return a.get("axes")


def _pads2d(pads):
    """ONNX pads [t, l, b, r] -> F.pad order (l, r, t, b)."""
    t, left, b, r = pads
    return (left, r, t, b)


def _conv(ins, a, transpose=False):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    k = len(w.shape) - 2
    pads = a.get("pads", [0] * 2 * k)
    stride, dil, groups = a.get("strides", [1] * k), a.get("dilations", [1] * k), a.get("group", 1)
    conv = {1: F.conv1d, 2: F.conv2d}[k] if not transpose else {1: F.conv_transpose1d, 2: F.conv_transpose2d}[k]
    if transpose:
        return conv(x, w, b, stride, [pads[i] for i in range(k)], a.get("output_padding", [0] * k), groups, dil)
    if pads[:k] == pads[k:]:
        return conv(x, w, b, stride, pads[:k], dil, groups)
    x = F.pad(x, _pads2d(pads) if k == 2 else (pads[0], pads[1]))
    return conv(x, w, b, stride, 0, dil, groups)


def _pool(ins, a, kind):
    x = ins[0]
    kernel, pads = a["kernel_shape"], a.get("pads", [0] * 2 * len(a["kernel_shape"]))
    stride, ceil = a.get("strides", [1] * len(kernel)), bool(a.get("ceil_mode", 0))
    if kind == "max":
        if pads[:2] != pads[2:]:
            x = F.pad(x, _pads2d(pads), value=-math.inf)
            pads = [0, 0, 0, 0]
        return F.max_pool2d(x, kernel, stride, pads[:2], a.get("dilations", [1, 1]), ceil_mode=ceil)
    return F.avg_pool2d(x, kernel, stride, pads[:2], ceil_mode=ceil, count_include_pad=bool(a.get("count_include_pad", 0)))


def _gemm(ins, a):
    x, w = ins[0], ins[1]
    x = x.T if a.get("transA", 0) else x
    w = w.T if a.get("transB", 0) else w
    out = a.get("alpha", 1.0) * (x @ w)
    return out + a.get("beta", 1.0) * ins[2] if len(ins) > 2 and ins[2] is not None else out


def _reshape(ins, a):
    shape = [int(s) for s in ins[1].tolist()]
    if not a.get("allowzero", 0):
        shape = [ins[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return ins[0].reshape(shape)


def _slice(ins, a):
    x = ins[0]
    starts, ends = ins[1].tolist(), ins[2].tolist()
    axes = ins[3].tolist() if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = ins[4].tolist() if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st < 0:
            raise EdgezoError("Slice with a negative step: not supported by the ONNX-to-torch interpreter")
        n = x.shape[ax]
        index[ax] = slice(max(-n, min(s, n)), max(-n, min(e, n)), st)
    return x[tuple(index)]


def _layer_norm(ins, a):
    axis = a.get("axis", -1) % ins[0].dim()
    shape = ins[0].shape[axis:]
    return F.layer_norm(ins[0], shape, ins[1], ins[2] if len(ins) > 2 else None, a.get("epsilon", 1e-5))


def _batch_norm(ins, a):
    x, scale, bias, mean, var = ins[:5]
    view = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean.view(view)) / torch.sqrt(var.view(view) + a.get("epsilon", 1e-5)) * scale.view(view) \
        + bias.view(view)


def _reduce(fn):
    def run(ins, a):
        axes = _axes(None, ins, a)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            return fn(ins[0], dim=tuple(range(ins[0].dim())), keepdim=keep)
        return fn(ins[0], dim=tuple(axes), keepdim=keep)
    return run


def _split(ins, a, outs):
    axis = a.get("axis", 0)
    sizes = ins[1].tolist() if len(ins) > 1 and ins[1] is not None else a.get("split")
    if sizes is None:
        sizes = [ins[0].shape[axis] // outs] * outs
    return list(torch.split(ins[0], sizes, dim=axis))


OPS = {
    "Add": lambda i, a: i[0] + i[1], "Sub": lambda i, a: i[0] - i[1], "Mul": lambda i, a: i[0] * i[1],
    "Div": lambda i, a: i[0] / i[1] if i[0].is_floating_point() else torch.div(i[0], i[1], rounding_mode="trunc"),
    "Pow": lambda i, a: torch.pow(i[0], i[1]), "Sqrt": lambda i, a: torch.sqrt(i[0]),
    "Neg": lambda i, a: -i[0], "Abs": lambda i, a: torch.abs(i[0]), "Exp": lambda i, a: torch.exp(i[0]),
    "Log": lambda i, a: torch.log(i[0]), "Reciprocal": lambda i, a: 1 / i[0],
    "MatMul": lambda i, a: i[0] @ i[1], "Gemm": _gemm,
    "Conv": _conv, "ConvTranspose": lambda i, a: _conv(i, a, transpose=True),
    "Relu": lambda i, a: F.relu(i[0]), "Sigmoid": lambda i, a: torch.sigmoid(i[0]),
    "Tanh": lambda i, a: torch.tanh(i[0]), "Erf": lambda i, a: torch.erf(i[0]),
    "Softplus": lambda i, a: F.softplus(i[0]), "Sin": lambda i, a: torch.sin(i[0]), "Cos": lambda i, a: torch.cos(i[0]),
    "LeakyRelu": lambda i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "HardSigmoid": lambda i, a: torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1),
    "HardSwish": lambda i, a: F.hardswish(i[0]),
    "Gelu": lambda i, a: F.gelu(i[0], approximate=a.get("approximate", "none")),
    "Clip": lambda i, a: torch.clamp(i[0], i[1] if len(i) > 1 and i[1] is not None else a.get("min"),
                                     i[2] if len(i) > 2 and i[2] is not None else a.get("max")),
    "Softmax": lambda i, a: torch.softmax(i[0], a.get("axis", -1)),
    "LogSoftmax": lambda i, a: torch.log_softmax(i[0], a.get("axis", -1)),
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
    "MaxPool": lambda i, a: _pool(i, a, "max"), "AveragePool": lambda i, a: _pool(i, a, "avg"),
    "GlobalAveragePool": lambda i, a: i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
    "Flatten": lambda i, a: i[0].reshape(int(np.prod(i[0].shape[:a.get("axis", 1)])), -1),
    "Reshape": _reshape, "Transpose": lambda i, a: i[0].permute(a.get("perm", list(range(i[0].dim()))[::-1])),
    "Identity": lambda i, a: i[0], "Dropout": lambda i, a: i[0],
    "Cast": lambda i, a: i[0].to(DTYPES[a["to"]]),
    "Shape": lambda i, a: torch.tensor(i[0].shape[a.get("start", 0):a.get("end", None)], dtype=torch.int64),
    "Gather": lambda i, a: torch.index_select(i[0], a.get("axis", 0), i[1].reshape(-1)).reshape(
        list(i[0].shape[:a.get("axis", 0) % i[0].dim()]) + list(i[1].shape) +
        list(i[0].shape[a.get("axis", 0) % i[0].dim() + 1:])),
    "Unsqueeze": lambda i, a: i[0].reshape(_unsqueezed(i[0].shape, _axes(None, i, a))),
    "Squeeze": lambda i, a: i[0].squeeze(tuple(_axes(None, i, a))) if _axes(None, i, a) else i[0].squeeze(),
    "Concat": lambda i, a: torch.cat(list(i), a["axis"]), "Slice": _slice,
    "Expand": lambda i, a: i[0] * torch.ones(i[1].tolist(), dtype=i[0].dtype),
    "ScatterElements": lambda i, a: i[0].scatter(a.get("axis", 0), i[1], i[2]),
    "Where": lambda i, a: torch.where(i[0], i[1], i[2]), "Equal": lambda i, a: i[0] == i[1],
    "Einsum": lambda i, a: torch.einsum(a["equation"].decode() if isinstance(a["equation"], bytes) else a["equation"],
                                        *i),
}


def _unsqueezed(shape, axes):
    out = list(shape)
    for ax in sorted(ax % (len(shape) + len(axes)) for ax in axes):
        out.insert(ax, 1)
    return out


class OnnxModule(torch.nn.Module):
    """loss.onnx of an artifact as a torch module: forward(*inputs) -> the tensor the loss reads."""

    def __init__(self, artifact_dir):
        super().__init__()
        artifact_dir = Path(artifact_dir)
        self.manifest = read(artifact_dir / "manifest.json")
        model = onnx.load(str(artifact_dir / self.manifest["files"]["loss"]))
        graph = model.graph
        self.entries = self.manifest["trainable"]
        init = np.load(artifact_dir / self.manifest["files"]["params"])
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.from_numpy(init[e["offset"]:e["offset"] + e["size"]].reshape(e["shape"]).copy()))
            for e in self.entries)
        self.consts = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
        from ..runtime.engine.graph import reachable
        from ..runtime.loss import scores_name
        self.output = scores_name(self.manifest)
        self.input_names = [v["name"] for v in self.manifest["inputs"]]
        self.nodes = reachable(graph, [self.output])[0]
        unknown = sorted({n.op_type for n in self.nodes if n.op_type not in OPS and n.op_type not in ("Constant", "Split")})
        if unknown:
            raise EdgezoError(f"the ONNX-to-torch interpreter has no op {unknown[0]}"
                              + (f" (nor {', '.join(unknown[1:])})" if len(unknown) > 1 else "")
                              + ": no first-order baseline for this model")

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        """(manifest name, Parameter) pairs, as a reference.pt2 module names them."""
        return iter(zip((e["name"] for e in self.entries), self.weights))

    def forward(self, *inputs):
        env = dict(self.consts)
        env[self.manifest["params_input"]] = torch.cat([w.reshape(-1) for w in self.weights])
        env.update(zip(self.input_names, inputs))
        for node in self.nodes:
            a = _attrs(node)
            if node.op_type == "Constant":
                env[node.output[0]] = torch.from_numpy(numpy_helper.to_array(a["value"]).copy()) if "value" in a \
                    else torch.tensor(a.get("value_ints", a.get("value_float", a.get("value_int"))))
                continue
            ins = [env[i] if i else None for i in node.input]
            out = _split(ins, a, len(node.output)) if node.op_type == "Split" else OPS[node.op_type](ins, a)
            for name, value in zip(node.output, out if isinstance(out, list) else [out]):
                env[name] = value
        return env[self.output]
