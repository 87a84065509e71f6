"""Ops that add or scale by a weight tensor: Add (a bias, or the residual join of two activations), Mul,
BatchNormalization (inference form), LayerNormalization."""
import numpy as np
from onnx import helper

from .graph import Unsupported
from .ops import Example, Op, const_node, feature_params, kernel_head, one_hot, register, take_block, unsqueeze


class Broadcast(Op):
    """Add or Mul of an activation and a weight tensor that broadcasts to it (biases of any rank, position
    embeddings, per-channel scales): element e moves the output positions it broadcasts to."""
    supports = frozenset({"direct", "device"})

    def direct_names(self, names, data, ctx):
        return names[::-1] if names[1] == data[0] else names  # w + x, w * x

    def parse_direct(self, ctx):
        names = self.bind_direct(ctx)
        shape, out_shape = tuple(ctx.entries[names[1]]["shape"]), ctx.shapes[self.output]
        if np.broadcast_shapes(shape, ctx.shapes[self.inputs[0]]) != tuple(out_shape) or \
                len(shape) > len(out_shape) or (len(shape) == len(out_shape) and shape[0] != 1):
            raise Unsupported(f"{self.node.op_type} whose weight {list(shape)} does not broadcast along the batch")

    def move(self, out, acts, x, role, e, d):
        onehot = np.zeros(self.param_shape(role), np.float32)
        onehot.flat[e] = d
        if self.node.op_type == "Add":
            out += onehot
        else:
            out += acts[self.inputs[0]] * onehot

    def kernel(self, role, shape, rank):
        n = kernel_head(rank) + one_hot("idx", int(np.prod(shape)), [-1] + [1] * (rank - len(shape)) + list(shape))
        n += [helper.make_node("Mul", ["E1", "dR"], ["m0"])]
        if self.node.op_type == "Add":
            return n + [helper.make_node("Identity", ["m0"], ["move"])]
        return n + [*unsqueeze("A", "A0", [0]), helper.make_node("Mul", ["m0", "A0"], ["move"])]


@register
class Add(Broadcast):
    """A bias added to [batch, features] (numpy layer), a weight of any rank that broadcasts (direct), or two
    activations: a residual join, where a change in one input's channel stays in that channel."""
    types = ("Add",)
    supports = frozenset({"forward", "propagate", "block", "direct", "device"})
    examples = (Example((3, 5), {"bias": (5,)}), Example((2, 3, 4), {"bias": (3, 4)}),
                Example((2, 3, 2, 2), {}, inputs=2))
    residual = False

    def roles(self):
        return ("input", "bias")

    def parse_numpy(self, ctx):
        data = ctx.data(self.node.input)
        if len(data) == 2:
            self.inputs, self.residual = data, True
            return
        self.bind_numpy(ctx)
        if "bias" not in self.params and "bias" not in self.const:
            raise Unsupported("op Add")
        rank = len(ctx.shapes[self.output])
        if rank != 2:
            raise Unsupported(f"Add on activations of rank {rank}")

    def forward_from(self, acts, x):
        if self.residual:
            return acts[self.inputs[0]] + acts[self.inputs[1]]
        return super().forward_from(acts, x)

    def forward(self, a, x):
        return a + self.value("bias", x)

    def copies(self, live, acts, samples, x):
        if not self.residual:
            return self.forward(live[self.inputs[0]], x)
        a, b = (live.get(name) for name in self.inputs)
        if a is not None and b is not None:
            return a + b
        changed, base = (a, acts[self.inputs[1]]) if a is not None else (b, acts[self.inputs[0]])
        return changed + base[samples]

    def carry(self, v, t, channels, size, x, acts):
        if self.residual:
            other = self.inputs[1] if self.inputs[0] == t else self.inputs[0]
            return v + take_block(acts[other], channels, v.shape)
        return self.on_block(v, channels, size, x)

    def on_block(self, v, channels, size, x):
        return v + feature_params(self.value("bias", x), channels, size, v)

    def block(self, a, z, x, role, element, delta):
        return element, (z[:, element].T + delta[:, None])[..., None]


@register
class Mul(Broadcast):
    types = ("Mul",)
    examples = (Example((2, 3, 4), {"weight": (4,)}), Example((2, 3, 2, 2), {"weight": (3, 1, 1)}))

    def roles(self):
        return ("input", "weight")


@register
class BatchNorm(Op):
    """BatchNormalization in inference form: per channel, a * scale / sqrt(var + eps) + (bias - mean * that)."""
    types = ("BatchNormalization",)
    supports = frozenset({"forward", "propagate", "block", "device"})
    examples = (Example((2, 3, 4, 4), {"scale": (3,), "bias": (3,), "mean": (3,), "var": (3,)}, {"epsilon": 1e-3}),
                Example((3, 5), {"scale": (5,), "bias": (5,), "mean": (5,), "var": (5,)}))

    def roles(self):
        return ("input", "scale", "bias", "mean", "var")

    def parse_numpy(self, ctx):
        self.bind_numpy(ctx)
        if self.attrs.get("training_mode", 0):
            raise Unsupported("BatchNormalization in training mode")
        self.eps = np.float32(self.attrs.get("epsilon", 1e-5))

    def scale_shift(self, x):
        scale = self.value("scale", x) / np.sqrt(self.value("var", x) + self.eps)
        return scale, self.value("bias", x) - self.value("mean", x) * scale

    def forward(self, a, x):  # a [N, C, ...]: any number of trailing axes (BatchNorm1d after a Gemm too)
        scale, shift = self.scale_shift(x)
        tail = (1,) * (a.ndim - 2)
        return a * scale.reshape(-1, *tail) + shift.reshape(-1, *tail)

    def on_block(self, v, channels, size, x):  # v [R, N, ...] blocks of channel channels[r]
        scale, shift = self.scale_shift(x)
        tail = (1,) * (v.ndim - 1)
        return v * scale[channels].reshape(-1, *tail) + shift[channels].reshape(-1, *tail)

    def block(self, a, z, x, role, element, delta):
        """A statistic of channel c moved: that channel's output recomputed at the moved value."""
        xs = np.repeat(x[None], len(element), axis=0)
        xs[np.arange(len(element)), self.params[role]["offset"] + element] += delta
        channels = element
        base_in = a[:, channels].transpose(1, 0, 2, 3) if a.ndim == 4 else a[:, channels].T[..., None]
        v = np.stack([self.on_block(base_in[r:r + 1], channels[r:r + 1], 1, xs[r])[0] for r in range(len(element))])
        return channels, v

    def kernel(self, role, shape, rank):  # channel idx of the output recomputed with the moved statistic
        channels, tail = shape[0], [1] * (rank - 2)
        n = kernel_head(rank)
        n += [const_node("pshape", [-1, 1] + tail),
              helper.make_node("Gather", ["A", "idx"], ["Ac0"], axis=1),
              helper.make_node("Transpose", ["Ac0"], ["Ac"], perm=[1, 0] + list(range(2, rank))),
              helper.make_node("Gather", ["Z", "idx"], ["Zc0"], axis=1),
              helper.make_node("Transpose", ["Zc0"], ["Zc"], perm=[1, 0] + list(range(2, rank)))]
        for r, name in zip(("scale", "bias", "mean", "var"), self.node.input[1:5]):
            n += [helper.make_node("Gather", [name, "idx"], [f"{r}_g"])]
            n += [helper.make_node("Add", [f"{r}_g", "delta"], [f"{r}_m"])] if r == role else \
                [helper.make_node("Identity", [f"{r}_g"], [f"{r}_m"])]
            n += [helper.make_node("Reshape", [f"{r}_m", "pshape"], [f"{r}_r"])]
        n += [const_node("eps", [float(self.attrs.get("epsilon", 1e-5))], np.float32),
              helper.make_node("Add", ["var_r", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
              helper.make_node("Sub", ["Ac", "mean_r"], ["cen"]), helper.make_node("Div", ["cen", "sd"], ["nrm"]),
              helper.make_node("Mul", ["nrm", "scale_r"], ["scl"]), helper.make_node("Add", ["scl", "bias_r"], ["new"]),
              helper.make_node("Sub", ["new", "Zc"], ["diff0"]), *unsqueeze("diff0", "diff", [2])]
        return n + one_hot("idx", channels, [-1, 1, channels] + tail) + [helper.make_node("Mul", ["diff", "E1"],
                                                                                         ["move"])]

    def kernel_reads(self):
        """Graph tensors the kernel reads besides A, Z, idx and delta (the statistics, computed from the params)."""
        return [n for n in self.node.input[1:] if n]


@register
class LayerNorm(Op):
    """LayerNormalization: scale element e moves normalized position e by delta x the normalized input, bias
    by delta."""
    types = ("LayerNormalization",)
    supports = frozenset({"direct", "device"})
    examples = (Example((2, 3, 6), {"scale": (6,), "bias": (6,)}, {"epsilon": 1e-5}),
                Example((2, 3, 4), {"scale": (3, 4), "bias": (3, 4)}, {"axis": 1}))

    def roles(self):
        return ("input", "scale", "bias")

    def parse_direct(self, ctx):
        self.bind_direct(ctx)
        self.axis, self.eps = int(self.attrs.get("axis", -1)), float(self.attrs.get("epsilon", 1e-5))

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

    def kernel(self, role, shape, rank):
        axis = int(self.attrs.get("axis", -1)) % rank
        n = kernel_head(rank) + one_hot("idx", int(np.prod(shape)), [-1] + [1] * axis + list(shape))
        n += [helper.make_node("Mul", ["E1", "dR"], ["m0"])]
        if role == "bias":
            return n + [helper.make_node("Identity", ["m0"], ["move"])]
        return n + [const_node("ones", np.ones(shape), np.float32), const_node("zeros", np.zeros(shape), np.float32),
                    helper.make_node("LayerNormalization", ["A", "ones", "zeros"], ["xhat"], axis=axis,
                                     epsilon=float(self.attrs.get("epsilon", 1e-5))),
                    *unsqueeze("xhat", "xhat0", [0]), helper.make_node("Mul", ["m0", "xhat0"], ["move"])]
