"""Linear ops with weights: Gemm / MatMul, Conv, ConvTranspose. A moved weight changes one output unit or
channel by a known amount (eps times one input column, or one shifted input map)."""
import numpy as np
from onnx import TensorProto, helper

from ..sessions import make_session
from .graph import Unsupported, attrs
from .ops import Example, Mode, Op, const_node, kernel_head, one_hot, register, unsqueeze


def _no_auto_pad(attrs, what):
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise Unsupported(what)


def _one_op_session(op_type, inputs, attrs, threads, device, opset):
    node = helper.make_node(op_type, list(inputs), ["Y"], **attrs)
    graph = helper.make_graph([node], op_type.lower(), [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                                        for n in inputs],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return make_session(model, device, threads, arena=False)


@register
class Gemm(Op):
    """Gemm (no transA, alpha = beta = 1) or MatMul by a weight [in, out] ([out, in] with transB, or a MatMul
    weight read through a Transpose)."""
    types = ("Gemm", "MatMul")
    supports = frozenset({"forward", "respond", "block", "direct", "device"})
    examples = (Example((3, 4), {"weight": (5, 4), "bias": (5,)}, {"transB": 1}, op_type="Gemm"),
                Example((3, 4), {"weight": (4, 5)}, op_type="MatMul"),
                Example((2, 3, 4), {"weight": (4, 5)}, op_type="MatMul"))
    linear = True

    def roles(self):
        return ("input", "weight", "bias") if self.node.op_type == "Gemm" else ("input", "weight")

    def check_gemm(self):
        a = self.attrs
        if self.node.op_type == "Gemm" and (a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
            raise Unsupported("Gemm with transA, alpha or beta")

    def parse_numpy(self, ctx):
        self.bind_numpy(ctx)
        self.check_gemm()
        self.trans_b = bool(self.attrs.get("transB", 0))
        rank = len(ctx.shapes[self.output])
        if rank != 2:
            raise Unsupported(f"{self.node.op_type} on activations of rank {rank}")

    def weight_names(self, names, ctx):
        t = ctx.producer.get(names[1]) if self.node.op_type == "MatMul" and names[1] not in ctx.entries else None
        if t is not None and t.op_type == "Transpose" and t.input[0] in ctx.entries and \
                list(attrs(t).get("perm", [1, 0])) == [1, 0]:
            names[1], self.transposed = t.input[0], True
        return names

    def parse_direct(self, ctx):
        self.bind_direct(ctx)
        self.check_gemm()
        self.trans_b = bool(self.attrs.get("transB", 0)) or self.transposed
        if self.node.op_type == "MatMul" and len(self.params["weight"]["shape"]) != 2:
            raise Unsupported("MatMul by a weight of rank other than 2")

    # numpy layer
    def weight(self, x):
        w = self.value("weight", x)
        return w if self.trans_b else w.T  # [out, in]

    def forward(self, a, x):
        out = a @ self.weight(x).T
        b = self.value("bias", x)
        return out + b if b is not None else out

    def block(self, a, z, x, role, element, delta):
        """Rows' perturbed output units: (unit index [R], values [R, N, 1])."""
        w_shape = self.value("weight", x).shape
        if role == "bias":
            return element, (z[:, element].T + delta[:, None])[..., None]
        out_idx, in_idx = (element // w_shape[1], element % w_shape[1]) if self.trans_b else \
            (element % w_shape[1], element // w_shape[1])
        return out_idx, (z[:, out_idx].T + delta[:, None] * a[:, in_idx].T)[..., None]

    def respond(self, x, channels, size, delta):
        """Output change [R, N, out] of a change `delta` [R, N, size] in input features channel*size+[0,size)."""
        cols = channels[:, None] * size + np.arange(size)
        w = self.weight(x)[:, cols].transpose(1, 2, 0)  # [R, size, out]
        return np.matmul(delta.reshape(len(delta), delta.shape[1], -1), w)

    # direct: weight (i, o) moves output column o by delta x input column i
    def move(self, out, acts, x, role, e, d):
        if role == "bias":
            out[..., e] += d
            return
        rows, cols = self.param_shape(role)
        i, o = (e % cols, e // cols) if self.trans_b else (e // cols, e % cols)
        out[..., o] += d * acts[self.inputs[0]][..., i]

    def kernel(self, role, shape, rank):
        rows, cols = shape if len(shape) == 2 else (1, shape[0])
        n = kernel_head(rank)
        if role == "bias":
            return n + one_hot("idx", cols, [-1] + [1] * (rank - 1) + [cols]) + \
                [helper.make_node("Mul", ["E1", "dR"], ["move"])]
        inner, out_n = (cols, cols) if not self.trans_b else (shape[1], rows)
        first, second = ("i", "o") if not self.trans_b else ("o", "i")
        return n + [const_node("inner", inner), helper.make_node("Div", ["idx", "inner"], [first]),
                    helper.make_node("Mod", ["idx", "inner"], [second]),
                    helper.make_node("Gather", ["A", "i"], ["col"], axis=-1),           # [N, ..., R]
                    helper.make_node("Transpose", ["col"], ["colT"], perm=[rank - 1] + list(range(rank - 1))),
                    *unsqueeze("colT", "colU", [rank])] + \
            one_hot("o", out_n, [-1] + [1] * (rank - 1) + [out_n]) + \
            [helper.make_node("Mul", ["colU", "E1"], ["m1"]), helper.make_node("Mul", ["m1", "dR"], ["move"])]


class ChannelOwner(Op):
    """An op whose bias adds to one output channel (axis 1); the weight's move is the subclass's."""

    def move(self, out, acts, x, role, e, d):
        if role == "bias":
            out[:, e] += d
        else:
            self.move_weight(out, acts, role, e, d)


@register
class Conv(ChannelOwner):
    """2-D Conv. Numpy layer (the convolution itself in a one-op onnxruntime session, MLAS) where it is ungrouped
    and undilated; a direct kernel for any group count, stride, padding and dilation."""
    types = ("Conv",)
    supports = frozenset({"forward", "respond", "block", "direct", "device"})
    examples = (Example((2, 3, 6, 6), {"weight": (4, 3, 3, 3), "bias": (4,)}, {"pads": [1, 1, 1, 1]}),
                Example((2, 4, 7, 7), {"weight": (4, 1, 3, 3), "bias": (4,)},
                        {"group": 4, "strides": [2, 2], "dilations": [1, 1]}),
                Example((2, 2, 8, 8), {"weight": (2, 2, 3, 3)}, {"dilations": [2, 2], "pads": [0, 1, 2, 1]}))
    linear = True
    prefers_onnxruntime = True  # convolutions run much faster in onnxruntime than in numpy
    session = None

    def roles(self):
        return ("input", "weight", "bias")

    def parse_numpy(self, ctx):
        self.bind_numpy(ctx)
        a = self.attrs
        if a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", [1, 1])):
            raise Unsupported("grouped or dilated Conv")
        _no_auto_pad(a, "Conv auto_pad")
        self.stride, self.pads = tuple(a.get("strides", [1, 1])), tuple(a.get("pads", [0, 0, 0, 0]))
        weight = self.params.get("weight", {}).get("shape") or self.const["weight"].shape
        self.kernel_shape = tuple(a.get("kernel_shape", weight[2:]))

    def parse_direct(self, ctx):
        self.bind_direct(ctx)
        a = self.attrs
        _no_auto_pad(a, "Conv auto_pad")
        if len(ctx.shapes[self.inputs[0]]) != 4:
            raise Unsupported("Conv that is not 2-D")
        self.group = int(a.get("group", 1))
        self.stride, self.dilation = tuple(a.get("strides", [1, 1])), tuple(a.get("dilations", [1, 1]))
        self.pads = tuple(a.get("pads", [0, 0, 0, 0]))

    def prepare(self, threads, device):
        if self.mode is Mode.NUMPY:
            self.session = _one_op_session("Conv", ("X", "W", "B"), {"pads": list(self.pads), "strides": list(
                self.stride), "kernel_shape": list(self.kernel_shape)}, threads, device, 18)

    # numpy layer
    def forward(self, a, x):
        return self.conv(a, self.value("weight", x), self.value("bias", x))

    def conv(self, a, w, b):
        if b is None:
            b = np.zeros(w.shape[0], np.float32)
        return self.session.run(None, {"X": np.ascontiguousarray(a, np.float32), "W": np.ascontiguousarray(w),
                                       "B": np.ascontiguousarray(b, np.float32)})[0]

    def block(self, a, z, x, role, element, delta):
        """Rows' perturbed output channels: (channel [R], maps [R, N, H', W'])."""
        w_shape = self.value("weight", x).shape
        if role == "bias":
            return element, z[:, element].transpose(1, 0, 2, 3) + delta[:, None, None, None]
        o, c, p, q = np.unravel_index(element, w_shape)
        t, l, bt, r = self.pads
        ap = np.pad(a, ((0, 0), (0, 0), (t, bt), (l, r))) if any(self.pads) else a
        oh, ow = z.shape[2:]
        sh, sw = self.stride
        rows = p[:, None] + sh * np.arange(oh)             # [R, oh]
        cols = q[:, None] + sw * np.arange(ow)             # [R, ow]
        shifted = ap[:, c[:, None, None], rows[:, :, None], cols[:, None, :]]  # [N, R, oh, ow]
        return o, z[:, o].transpose(1, 0, 2, 3) + delta[:, None, None, None] * shifted.transpose(1, 0, 2, 3)

    def respond(self, x, channels, size, delta):
        """Output change [R, N, O, H', W'] of a change [R, N, H, W] in input channel channels[r]."""
        w = self.value("weight", x)
        R, N = delta.shape[:2]
        out = np.empty((R, N, w.shape[0]) + self._out_hw(delta.shape[2:]), np.float32)
        for c in np.unique(channels):
            rows = np.flatnonzero(channels == c)
            maps = delta[rows].reshape(len(rows) * N, 1, *delta.shape[2:])
            out[rows] = self.conv(maps, np.ascontiguousarray(w[:, c:c + 1]), None).reshape(len(rows), N, w.shape[0],
                                                                                          *out.shape[3:])
        return out

    def _out_hw(self, hw):
        kh, kw = self.kernel_shape
        t, l, b, r = self.pads
        return ((hw[0] + t + b - kh) // self.stride[0] + 1, (hw[1] + l + r - kw) // self.stride[1] + 1)

    # direct: weight (o, c, p, q) moves output channel o by delta x the input map of channel
    # (group of o) x C/groups + c seen through tap (p, q); bias by delta
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

    def kernel(self, role, shape, rank):
        o_n = shape[0]
        n = kernel_head(rank)
        if role == "bias":
            return n + one_hot("idx", o_n, [-1, 1, o_n, 1, 1]) + [helper.make_node("Mul", ["E1", "dR"], ["move"])]
        _, c_n, kh, kw = shape
        group = int(self.attrs.get("group", 1))
        channels = c_n * group
        # flat index o*c*kh*kw + c*kh*kw + p*kw + q -> o, and (input channel, p, q) of a full-C one-hot kernel
        n += [const_node("ckk", c_n * kh * kw), const_node("kk", kh * kw), const_node("per_g", o_n // group),
              const_node("cg", c_n),
              helper.make_node("Div", ["idx", "ckk"], ["o"]), helper.make_node("Mod", ["idx", "ckk"], ["rest"]),
              helper.make_node("Div", ["o", "per_g"], ["g"]), helper.make_node("Mul", ["g", "cg"], ["g0"]),
              helper.make_node("Div", ["rest", "kk"], ["c"]), helper.make_node("Mod", ["rest", "kk"], ["pq"]),
              helper.make_node("Add", ["g0", "c"], ["ch"]), helper.make_node("Mul", ["ch", "kk"], ["chk"]),
              helper.make_node("Add", ["chk", "pq"], ["hot"]),
              const_node("kdepth", [channels * kh * kw]), const_node("koh_v", [0.0, 1.0], np.float32),
              helper.make_node("OneHot", ["hot", "kdepth", "koh_v"], ["K0"]),
              const_node("K_shape", [-1, channels, kh, kw]), helper.make_node("Reshape", ["K0", "K_shape"], ["K"]),
              helper.make_node("Conv", ["A", "K"], ["S"], pads=list(self.attrs.get("pads", [0, 0, 0, 0])),
                               strides=list(self.attrs.get("strides", [1, 1])),
                               dilations=list(self.attrs.get("dilations", [1, 1])), kernel_shape=[kh, kw]),
              helper.make_node("Transpose", ["S"], ["ST"], perm=[1, 0, 2, 3]),  # [R, N, oh, ow]
              *unsqueeze("ST", "SU", [2])]
        return n + one_hot("o", o_n, [-1, 1, o_n, 1, 1]) + \
            [helper.make_node("Mul", ["SU", "E1"], ["m1"]), helper.make_node("Mul", ["m1", "dR"], ["move"])]


@register
class ConvTranspose(ChannelOwner):
    """2-D ConvTranspose: weight (c, o, p, q) (layout [C_in, C_out / groups, kh, kw]) moves output channel
    (group of c) x C_out/groups + o by delta x input channel c scattered through tap (p, q); bias by delta. The
    scatter is onnxruntime's ConvTranspose of that one channel with a one-hot kernel (same strides, pads,
    dilations, output shape)."""
    types = ("ConvTranspose",)
    supports = frozenset({"direct"})
    examples = (Example((2, 3, 4, 4), {"weight": (3, 2, 3, 3), "bias": (2,)}, {"strides": [2, 2], "pads": [1, 1, 1, 1]}),)

    def roles(self):
        return ("input", "weight", "bias")

    def parse_direct(self, ctx):
        self.bind_direct(ctx)
        if len(ctx.shapes[self.inputs[0]]) != 4:
            raise Unsupported("ConvTranspose that is not 2-D, or with auto_pad")
        _no_auto_pad(self.attrs, "ConvTranspose that is not 2-D, or with auto_pad")
        self.group = int(self.attrs.get("group", 1))
        kept = {k: v for k, v in self.attrs.items() if k in ("strides", "pads", "dilations", "output_padding")}
        self.session = _one_op_session("ConvTranspose", ("X", "W"), dict(kept, output_shape=list(
            ctx.shapes[self.output][2:])), None, "cpu", 17)

    def move_weight(self, out, acts, role, e, d):
        c_n, o_g, kh, kw = self.param_shape(role)
        c, o, p, q = np.unravel_index(e, (c_n, o_g, kh, kw))
        kernel = np.zeros((1, 1, kh, kw), np.float32)
        kernel[0, 0, p, q] = 1
        a = np.ascontiguousarray(acts[self.inputs[0]][:, c:c + 1])
        spread = self.session.run(None, {"X": a, "W": kernel})[0]
        out[:, (c // (c_n // self.group)) * o_g + o] += d * spread[:, 0]
