"""The engine's numpy layers: each op's forward, its response to a one-channel change, and the per-sample
loss. Ops without numpy code become Opaque (onnxruntime computes them; see engine.py for the paths)."""
import numpy as np

from .sessions import make_session

class Unsupported(Exception):
    """The graph or probe is outside what the engine handles; the message says why."""


def maxpool(x, kernel, stride):
    """Max pooling over the last two axes of x (no padding, floor mode): an elementwise max of the
    kernel's strided shifts, much faster in numpy than a max-reduction over window axes."""
    (kh, kw), (sh, sw) = kernel, stride
    h, w = x.shape[-2:]
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            shifted = x[..., i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            out = shifted.copy() if out is None else np.maximum(out, shifted, out=out)
    return out


def per_sample_losses(out, target, kind):
    """out [P, ...] model outputs of P samples, target [P, ...] -> P losses (float64). The batch loss
    (mean over samples, and over outputs for mse) is their mean."""
    if kind == "mse":
        diff = out.astype(np.float64) - target
        return (diff * diff).reshape(len(out), -1).mean(axis=1)
    if kind == "binary_cross_entropy":  # on logits z: max(z, 0) - z y + log(1 + exp(-|z|))
        z = out.astype(np.float64)
        return (np.maximum(z, 0) - z * target + np.log1p(np.exp(-np.abs(z)))).reshape(len(out), -1).mean(axis=1)
    z = out.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return np.log(np.exp(z).sum(axis=-1)) - np.take_along_axis(z, target[:, None], axis=-1)[:, 0]


def scores_name(manifest):
    """The tensor the loss reads: the logits before a Softmax/Sigmoid output, else the model output."""
    return manifest["loss"].get("logits") or manifest["outputs"][0]["name"]


# ---------------------------------------------------------------- layers


class Layer:
    """One op of the graph. `params` maps a role ("weight", "bias", ...) to a trainable tensor entry;
    `inputs` are the names of its activation inputs, `output` the name of its activation output."""
    linear = False  # Gemm / MatMul / Conv end a block's sparse stretch; the other ops keep a change in its channel

    def __init__(self, node, const, params, inputs):
        self.node, self.const, self.params = node, const, params
        self.inputs, self.output = inputs, node.output[0]

    def forward_from(self, acts, x):
        return self.forward(acts[self.inputs[0]], x)

    def copies(self, live, acts, samples, x):
        """This op on the changed rows of its input; row p is a copy of base sample samples[p]."""
        return self.forward(live[self.inputs[0]], x)

    def value(self, role, x):
        """The current value of an input tensor: a slice of the flat params, or a constant."""
        entry = self.params.get(role)
        if entry is None:
            return self.const.get(role)
        return x[entry["offset"]:entry["offset"] + entry["size"]].reshape(entry["shape"])


class Opaque(Layer):
    """An op the numpy layers do not cover: onnxruntime computes its base value; perturbations that reach it
    (or own a tensor it reads) take the naive path."""

    def forward_from(self, acts, x):
        raise Unsupported(f"op {self.node.op_type}")


class Gemm(Layer):
    linear = True

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


class Conv(Layer):
    linear = True

    session = None  # a one-op onnxruntime Conv session (MLAS), made by make_session

    def forward(self, a, x):
        return self.conv(a, self.value("weight", x), self.value("bias", x))

    def conv(self, a, w, b):
        if b is None:
            b = np.zeros(w.shape[0], np.float32)
        return self.session.run(None, {"X": np.ascontiguousarray(a, np.float32), "W": np.ascontiguousarray(w),
                                       "B": np.ascontiguousarray(b, np.float32)})[0]

    def make_session(self, threads, device="cpu"):
        from onnx import TensorProto, helper
        node = helper.make_node("Conv", ["X", "W", "B"], ["Y"], pads=list(self.pads), strides=list(self.stride),
                                kernel_shape=list(self.kernel))
        graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                                   for n in ("X", "W", "B")],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        self.session = make_session(model, device, threads, arena=False)

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
        kh, kw = self.kernel
        t, l, b, r = self.pads
        return ((hw[0] + t + b - kh) // self.stride[0] + 1, (hw[1] + l + r - kw) // self.stride[1] + 1)


class Relu(Layer):
    def forward(self, a, x):
        return np.maximum(a, 0)

    def on_block(self, v, channels, size, x):
        return np.maximum(v, 0)


class LeakyRelu(Layer):
    alpha = np.float32(0.01)

    def forward(self, a, x):
        return np.where(a < 0, self.alpha * a, a)

    def on_block(self, v, channels, size, x):
        return np.where(v < 0, self.alpha * v, v)


class MaxPool(Layer):
    def forward(self, a, x):
        return maxpool(a, self.kernel, self.stride)

    def on_block(self, v, channels, size, x):
        return maxpool(v, self.kernel, self.stride)


class Bias(Layer):
    """Add of a per-feature (or per-channel) tensor: a MatMul's bias."""

    def forward(self, a, x):
        return a + self.value("bias", x)

    def on_block(self, v, channels, size, x):
        b = self.value("bias", x)
        return v + _feature_params(b, channels, size, v)

    def block(self, a, z, x, role, element, delta):
        return element, (z[:, element].T + delta[:, None])[..., None]


class BatchNorm(Layer):
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


class Flatten(Layer):
    def forward(self, a, x):
        return a.reshape(len(a), -1)

    def on_block(self, v, channels, size, x):
        return v.reshape(len(v), v.shape[1], -1)


class SpatialMean(Layer):
    """ReduceMean over the two spatial axes, or GlobalAveragePool."""

    def forward(self, a, x):
        return a.mean(axis=(2, 3), keepdims=self.keepdims)

    def on_block(self, v, channels, size, x):
        return v.mean(axis=(2, 3), keepdims=True) if self.keepdims else v.mean(axis=(2, 3))[..., None]


class Sum(Layer):
    """Add of two activations (a residual join): a change in one input's channel stays in that channel."""

    def forward_from(self, acts, x):
        return acts[self.inputs[0]] + acts[self.inputs[1]]

    def copies(self, live, acts, samples, x):
        a, b = (live.get(name) for name in self.inputs)
        if a is not None and b is not None:
            return a + b
        changed, base = (a, acts[self.inputs[1]]) if a is not None else (b, acts[self.inputs[0]])
        return changed + base[samples]


def _feature_params(p, channels, size, v):
    if v.ndim == 4:  # [R, N, H, W] block of a channel
        return p[channels][:, None, None, None]
    cols = channels[:, None] * size + np.arange(size)
    return p[cols][:, None, :]
