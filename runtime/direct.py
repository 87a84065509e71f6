"""Perturbed-output kernels for parametrized ops that delta propagation does not carry (activations of any
rank, grouped or dilated convolutions, LayerNormalization, Mul/Add by a weight tensor): for R coordinate
perturbations of one of the op's trainable inputs, the R copies of its output [R, N, ...] computed from the
base output and input in O(copies) work, without rerunning the op. The rest of the graph then runs on the
copies (numpy layers or onnxruntime on the copies stacked on the batch axis)."""
import numpy as np

from .graph import _attrs
from .layers import Opaque, Unsupported
from .sessions import make_session


class Direct(Opaque):
    """An op with a perturbed-output kernel; onnxruntime computes its base value like any Opaque op."""

    def perturbed(self, acts, x, role, element, delta):
        """Copies [R, N, ...] of this op's output with element[r] of input `role` moved by delta[r]."""
        z = acts[self.output]
        copies = np.repeat(z[None], len(element), axis=0)
        for r, (e, d) in enumerate(zip(element, delta)):
            self.move(copies[r], acts, x, role, int(e), d)
        return copies

    def param_shape(self, role):
        return tuple(self.params[role]["shape"])

    def of_input(self, acts, make):
        """make(input activation), computed once per step's activation (the rows of a chunk share it)."""
        a = acts[self.inputs[0]]
        if getattr(self, "_cached", (None,))[0] is not a:
            self._cached = (a, make(a))
        return self._cached[1]


class MatMulDirect(Direct):
    """MatMul by a weight [in, out] (or Gemm's weight and bias) on input [..., in]: weight (i, o) moves output
    column o by delta x input column i."""

    def move(self, out, acts, x, role, e, d):
        if role == "bias":
            out[..., e] += d
            return
        rows, cols = self.param_shape(role)
        i, o = (e % cols, e // cols) if self.trans_b else (e // cols, e % cols)
        out[..., o] += d * acts[self.inputs[0]][..., i]


class BroadcastDirect(Direct):
    """Add or Mul of an activation and a weight tensor that broadcasts to it (biases of any rank, position
    embeddings, per-channel scales): element e moves the output positions it broadcasts to."""

    def move(self, out, acts, x, role, e, d):
        onehot = np.zeros(self.param_shape(role), np.float32)
        onehot.flat[e] = d
        if self.node.op_type == "Add":
            out += onehot
        else:
            out += acts[self.inputs[0]] * onehot


class LayerNormDirect(Direct):
    """LayerNormalization: scale element e moves normalized position e by delta x the normalized input, bias
    by delta."""

    def move(self, out, acts, x, role, e, d):
        flat = out.reshape(-1, int(np.prod(self.param_shape(role))))
        if role == "bias":
            flat[:, e] += d
        else:
            flat[:, e] += d * self.normalized(acts)[:, e]

    def normalized(self, acts):
        def normalize(a):
            flat = a.reshape(int(np.prod(a.shape[:self.axis % a.ndim])), -1).astype(np.float64)
            mean = flat.mean(axis=1, keepdims=True)
            var = ((flat - mean) ** 2).mean(axis=1, keepdims=True)
            return ((flat - mean) / np.sqrt(var + self.eps)).astype(np.float32)
        return self.of_input(acts, normalize)


class ChannelDirect(Direct):
    """An op whose bias adds to one output channel (axis 1); the weight's move is the subclass's."""

    def move(self, out, acts, x, role, e, d):
        if role == "bias":
            out[:, e] += d
        else:
            self.move_weight(out, acts, role, e, d)


class ConvDirect(ChannelDirect):
    """Conv of any group count, stride, padding and dilation: weight (o, c, p, q) moves output channel o by
    delta x the input map of channel (group of o) x C/groups + c seen through tap (p, q); bias by delta."""

    def move_weight(self, out, acts, role, e, d):
        o_n, c_n, kh, kw = self.param_shape(role)
        o, c, p, q = np.unravel_index(e, (o_n, c_n, kh, kw))
        channel = (o // (o_n // self.group)) * c_n + c
        a = self.padded(acts)[:, channel]
        (sh, sw), (dh, dw) = self.stride, self.dilation
        oh, ow = out.shape[2:]
        out[:, o] += d * a[:, p * dh:p * dh + sh * (oh - 1) + 1:sh, q * dw:q * dw + sw * (ow - 1) + 1:sw]

    def padded(self, acts):
        t, l, b, r = self.pads
        return self.of_input(acts, lambda a: np.pad(a, ((0, 0), (0, 0), (t, b), (l, r))) if any(self.pads) else a)


class ConvTransposeDirect(ChannelDirect):
    """ConvTranspose: weight (c, o, p, q) (layout [C_in, C_out / groups, kh, kw]) moves output channel
    (group of c) x C_out/groups + o by delta x input channel c scattered through tap (p, q); bias by delta. The
    scatter is onnxruntime's ConvTranspose of that one channel with a one-hot kernel (same strides, pads,
    dilations, output shape)."""

    def move_weight(self, out, acts, role, e, d):
        c_n, o_g, kh, kw = self.param_shape(role)
        c, o, p, q = np.unravel_index(e, (c_n, o_g, kh, kw))
        kernel = np.zeros((1, 1, kh, kw), np.float32)
        kernel[0, 0, p, q] = 1
        a = np.ascontiguousarray(acts[self.inputs[0]][:, c:c + 1])
        spread = self.session.run(None, {"X": a, "W": kernel})[0]
        out[:, (c // (c_n // self.group)) * o_g + o] += d * spread[:, 0]

    def make_session(self, threads, device, out_hw):
        from onnx import TensorProto, helper
        attrs = {k: v for k, v in _attrs(self.node).items() if k in ("strides", "pads", "dilations", "output_padding")}
        node = helper.make_node("ConvTranspose", ["X", "W"], ["Y"], output_shape=list(out_hw), **attrs)
        graph = helper.make_graph([node], "spread", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                                     for n in ("X", "W")],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
        self.session = make_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), device,
                                    threads, arena=False)


def make_direct(node, entries, used, kinds, shapes, producer):
    """The Direct layer for `node` whose trainable inputs are whole tensors of `entries` (a MatMul's weight
    also through a Transpose); raises Unsupported."""
    op, attrs = node.op_type, _attrs(node)
    data = [n for n in node.input if kinds.get(n) == "data"]
    if len(data) != 1:
        raise Unsupported(f"{op} with {len(data)} activation inputs")
    roles = {"MatMul": ("input", "weight"), "Gemm": ("input", "weight", "bias"), "Conv": ("input", "weight", "bias"),
             "ConvTranspose": ("input", "weight", "bias"),
             "LayerNormalization": ("input", "scale", "bias"), "Add": ("input", "bias"),
             "Mul": ("input", "weight")}.get(op)
    if roles is None:
        raise Unsupported(f"op {op}")
    names = list(node.input)
    if op in ("Add", "Mul") and names[1] == data[0]:  # w + x, w * x
        names = names[::-1]
    if names[0] != data[0]:
        raise Unsupported(f"{op} reads its activation as input {names.index(data[0])}")
    transposed = False
    if op == "MatMul" and names[1] not in entries and names[1] in producer:
        t = producer[names[1]]
        if t.op_type == "Transpose" and t.input[0] in entries and list(_attrs(t).get("perm", [1, 0])) == [1, 0]:
            names[1], transposed = t.input[0], True
    params = {role: entries[n] for role, n in zip(roles[1:], names[1:]) if n in entries}
    if not params:
        raise Unsupported(f"{op} holds its trainable tensor through other ops")
    if any(entries[n]["name"] in used for n in names[1:] if n in entries):
        raise Unsupported(f"a tensor of {op} {node.output[0]!r} is used twice")
    cls = {"MatMul": MatMulDirect, "Gemm": MatMulDirect, "Conv": ConvDirect, "ConvTranspose": ConvTransposeDirect,
           "LayerNormalization": LayerNormDirect,
           "Add": BroadcastDirect, "Mul": BroadcastDirect}[op]
    layer = cls(node, {}, params, data)
    out_shape, in_shape = shapes[node.output[0]], shapes[data[0]]
    if op == "Gemm":
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise Unsupported("Gemm with transA, alpha or beta")
    layer.trans_b, layer.transposed = bool(attrs.get("transB", 0)) or transposed, transposed
    if op == "MatMul" and len(params["weight"]["shape"]) != 2:
        raise Unsupported("MatMul by a weight of rank other than 2")
    if op in ("Add", "Mul"):
        shape = tuple(entries[names[1]]["shape"])
        if np.broadcast_shapes(shape, in_shape) != tuple(out_shape) or len(shape) > len(out_shape) or \
                (len(shape) == len(out_shape) and shape[0] != 1):
            raise Unsupported(f"{op} whose weight {list(shape)} does not broadcast along the batch")
    if op == "LayerNormalization":
        layer.axis, layer.eps = int(attrs.get("axis", -1)), float(attrs.get("epsilon", 1e-5))
    if op == "Conv":
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise Unsupported("Conv auto_pad")
        if len(in_shape) != 4:
            raise Unsupported("Conv that is not 2-D")
        layer.group = int(attrs.get("group", 1))
        layer.stride = tuple(attrs.get("strides", [1, 1]))
        layer.dilation = tuple(attrs.get("dilations", [1, 1]))
        layer.pads = tuple(attrs.get("pads", [0, 0, 0, 0]))
    if op == "ConvTranspose":
        if len(in_shape) != 4 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise Unsupported("ConvTranspose that is not 2-D, or with auto_pad")
        layer.group = int(attrs.get("group", 1))
        layer.make_session(None, "cpu", out_shape[2:])
    used.update(e["name"] for e in params.values())
    return layer
