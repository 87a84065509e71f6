"""The op registry: one class per op kind, in this file and ops_*.py, registered for its ONNX op types.

An op class parses its own attributes from the node and declares in `supports` what it can do:
- "forward": numpy forward of the op (the engine's numpy layers, and prefix reuse without onnxruntime);
- "propagate": on_block, the op on a one-channel (one-unit) change, so delta propagation carries it;
- "respond": a linear op's output change for a change in one input channel (unit) block (ends propagation);
- "block": the perturbed output block of a weight it owns, computed directly (Gemm, Conv, bias, BatchNorm);
- "direct": move, the perturbed output copies of a weight it owns at any rank (the engine runs the rest stacked);
- "device": kernel, the same perturbed copies as ONNX nodes, so the device engine keeps them on the accelerator.
`read(node, ctx)` makes the op in the best mode its node allows: NUMPY (forward/propagate/block), else DIRECT
(onnxruntime computes the base value, `move` the copies), else OPAQUE (onnxruntime only; its tensors take the
generic path). An op type that no class registers is read as the base Op: OPAQUE. Adding an op is one class with
@register; tests/test_kernels.py checks every declared capability of every registered class against onnxruntime
on the class's own `examples`.
"""
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from onnx import helper, numpy_helper

from .graph import Unsupported, attrs, subgraph_inputs

OPS = {}  # ONNX op type -> op class


def register(cls):
    for op_type in cls.types:
        assert op_type not in OPS, f"{op_type} registered twice"
        OPS[op_type] = cls
    return cls


class Mode(Enum):
    NUMPY = "numpy"    # numpy layer: forward, delta propagation, blocks of its weights
    DIRECT = "direct"  # onnxruntime computes its base output; `move` gives the perturbed copies of its weights
    OPAQUE = "opaque"  # onnxruntime only


@dataclass
class Context:
    """What reading a node needs from the graph: constants, trainable entries, tensor kinds, activation shapes
    (at a batch of 2), producers, and the trainable tensors already owned by an earlier op."""
    const: dict
    entries: dict
    kinds: dict
    shapes: dict = field(default_factory=dict)
    producer: dict = field(default_factory=dict)
    used: set = field(default_factory=set)
    param_deps: dict = field(default_factory=dict)  # tensor -> the trainable tensors it is computed from

    def data(self, names):
        return [n for n in names if self.kinds.get(n) == "data"]


@dataclass(frozen=True)
class Example:
    """A test case of an op class: node attributes, the activation's shape, the other inputs' shapes by role (all
    trainable), and the op type where a class reads several."""
    input_shape: tuple
    weights: dict
    attrs: dict = field(default_factory=dict)
    op_type: str = None
    inputs: int = 1  # activation inputs (2: a residual Add)


class Op:
    """One node of the loss graph. `params` maps a role ("weight", "bias", ...) to a trainable tensor entry,
    `const` a role to a constant; `inputs` are its activation inputs, `output` its activation output."""
    types = ()
    supports = frozenset()
    examples = ()
    linear = False          # Gemm / MatMul / Conv end a block's sparse stretch
    prefers_onnxruntime = False  # its base forward is faster as an onnxruntime call than in numpy
    transposed = False      # a MatMul weight read through a Transpose
    mode = Mode.OPAQUE

    def __init__(self, node, inputs):
        self.node, self.inputs, self.output = node, inputs, node.output[0]
        self.attrs = attrs(node)
        self.params, self.const, self.reason, self.starts = {}, {}, "", None

    def roles(self):
        return ("input",)

    @classmethod
    def read(cls, node, ctx):
        """The op for `node` in the best mode it allows; its `reason` says why a better one did not apply."""
        reads = list(dict.fromkeys(ctx.data(subgraph_inputs(node))))
        op = cls(node, reads)
        try:
            op.parse_numpy(ctx)
            op.mode = Mode.NUMPY
            return op
        except Unsupported as e:
            op.reason, op.params, op.const = str(e), {}, {}
        try:
            op.parse_direct(ctx)
            op.mode = Mode.DIRECT
        except Unsupported:
            op.params, op.mode, op.inputs = {}, Mode.OPAQUE, reads
        return op

    def parse_numpy(self, ctx):
        raise Unsupported(f"op {self.node.op_type}")

    def parse_direct(self, ctx):
        raise Unsupported(f"op {self.node.op_type}")

    def bind_numpy(self, ctx):
        """One activation input first; every other input a trainable tensor or a constant, by role."""
        data = ctx.data(self.node.input)
        if len(data) != 1 or self.node.input[0] != data[0]:
            raise Unsupported(f"{self.node.op_type} {self.output!r} with activation inputs {list(self.node.input)}")
        self.inputs = data
        for role, name in zip(self.roles()[1:], self.node.input[1:]):
            if name in ctx.entries:
                if name in ctx.used or any(e["name"] == name for e in self.params.values()):
                    raise Unsupported(f"tensor {name!r} is used twice")
                self.params[role] = ctx.entries[name]
            elif name in ctx.const:
                self.const[role] = ctx.const[name].astype(np.float32)
            else:
                raise Unsupported(f"{self.node.op_type} input {name!r} is neither a parameter nor a constant")

    def direct_names(self, names, data, ctx):
        """The node's inputs as the direct kernel reads them (a subclass swaps or looks through a Transpose)."""
        return names

    def bind_direct(self, ctx):
        """One activation input, first; whole trainable tensors by role."""
        op = self.node.op_type
        data = ctx.data(self.node.input)
        if len(data) != 1:
            raise Unsupported(f"{op} with {len(data)} activation inputs")
        names = self.direct_names(list(self.node.input), data, ctx)
        if names[0] != data[0]:
            raise Unsupported(f"{op} reads its activation as input {names.index(data[0])}")
        names = self.weight_names(names, ctx)
        self.inputs = data
        self.params = {role: ctx.entries[n] for role, n in zip(self.roles()[1:], names[1:]) if n in ctx.entries}
        if not self.params:
            raise Unsupported(f"{op} holds its trainable tensor through other ops")
        if any(ctx.entries[n]["name"] in ctx.used for n in names[1:] if n in ctx.entries):
            raise Unsupported(f"a tensor of {op} {self.output!r} is used twice")
        return names

    def weight_names(self, names, ctx):
        return names

    def prepare(self, threads, device):
        """Sessions the op's numpy code needs (made once the graph is read)."""

    # ------------------------------------------------------------ numpy

    def forward_from(self, acts, x):
        if "forward" not in self.supports or self.mode is not Mode.NUMPY:
            raise Unsupported(f"op {self.node.op_type}")
        return self.forward(acts[self.inputs[0]], x)

    def copies(self, live, acts, samples, x):
        """This op on the changed rows of its input; row p is a copy of base sample samples[p]."""
        return self.forward(live[self.inputs[0]], x)

    def carry(self, v, t, channels, size, x, acts):
        """A block change v [R, N, ...] of input t carried through this op (delta propagation)."""
        return self.on_block(v, channels, size, x)

    def value(self, role, x):
        """The current value of an input tensor: a slice of the flat params, or a constant."""
        entry = self.params.get(role)
        if entry is None:
            return self.const.get(role)
        return x[entry["offset"]:entry["offset"] + entry["size"]].reshape(entry["shape"])

    # ------------------------------------------------------------ direct

    def perturbed(self, acts, x, role, element, delta):
        """Copies [R, N, ...] of this op's output with element[r] of input `role` moved by delta[r]."""
        z = acts[self.output]
        copies = np.repeat(z[None], len(element), axis=0)
        for r, (e, d) in enumerate(zip(element, delta)):
            self.move(copies[r], acts, x, role, int(e), d)
        return copies

    def kernel_reads(self):
        """Graph tensors the device kernel reads besides A, Z, idx and delta."""
        return []

    def param_shape(self, role):
        return tuple(self.params[role]["shape"])

    def of_input(self, acts, make):
        """make(input activation), computed once per step's activation (the rows of a chunk share it)."""
        a = acts[self.inputs[0]]
        if getattr(self, "_cached", (None,))[0] is not a:
            self._cached = (a, make(a))
        return self._cached[1]


# ---------------------------------------------------------------- kernel graphs (device engine)

def const_node(name, value, dtype=np.int64):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype), name))


def unsqueeze(name, out, axes):
    return [const_node(out + "__ax", axes), helper.make_node("Unsqueeze", [name, out + "__ax"], [out])]


def one_hot(index, depth, shape, out="E1"):
    """Nodes: one-hot rows of `index` over `depth` values, reshaped to `shape` (-1 for the rows)."""
    return [const_node("depth", [depth]), const_node("oh_v", [0.0, 1.0], np.float32),
            helper.make_node("OneHot", [index, "depth", "oh_v"], ["E"]), const_node("E_shape", shape),
            helper.make_node("Reshape", ["E", "E_shape"], [out])]


def kernel_head(rank):
    """Nodes every kernel starts with: delta broadcast over Z's axes (dR [R, 1, ..., 1]) and Z0 [1, *Z.shape]."""
    return unsqueeze("delta", "dR", list(range(1, rank + 1))) + unsqueeze("Z", "Z0", [0])


# ---------------------------------------------------------------- elementwise and shape ops

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


class Elementwise(Op):
    """A parameter-free op that keeps a change inside its unit or channel."""
    supports = frozenset({"forward", "propagate"})

    def parse_numpy(self, ctx):
        self.bind_numpy(ctx)

    def on_block(self, v, channels, size, x):
        return self.forward(v, x)


@register
class Relu(Elementwise):
    types = ("Relu",)
    examples = (Example((2, 3, 4, 4), {}),)

    def forward(self, a, x):
        return np.maximum(a, 0)


@register
class LeakyRelu(Elementwise):
    types = ("LeakyRelu",)
    examples = (Example((2, 5), {}, {"alpha": 0.1}),)

    def parse_numpy(self, ctx):
        self.bind_numpy(ctx)
        self.alpha = np.float32(self.attrs.get("alpha", 0.01))

    def forward(self, a, x):
        return np.where(a < 0, self.alpha * a, a)


@register
class MaxPool(Elementwise):
    types = ("MaxPool",)
    examples = (Example((2, 3, 6, 6), {}, {"kernel_shape": [2, 2], "strides": [2, 2]}),)

    def parse_numpy(self, ctx):
        self.bind_numpy(ctx)
        a = self.attrs
        if any(a.get("pads", [0] * 4)) or a.get("ceil_mode", 0) or any(d != 1 for d in a.get("dilations", [1, 1])):
            raise Unsupported("MaxPool with padding, ceil mode or dilation")
        self.kernel, self.stride = tuple(a["kernel_shape"]), tuple(a.get("strides", [1, 1]))

    def forward(self, a, x):
        return maxpool(a, self.kernel, self.stride)


@register
class Flatten(Elementwise):
    """Flatten (axis 1), or a Reshape to [batch, -1]."""
    types = ("Flatten", "Reshape")
    examples = (Example((2, 3, 2, 2), {}),)

    def parse_numpy(self, ctx):
        self.bind_numpy(ctx)
        if self.node.op_type == "Flatten" and self.attrs.get("axis", 1) != 1:
            raise Unsupported("Flatten with axis != 1")
        shape = ctx.shapes.get(self.output)
        if shape is not None and tuple(shape) != (2, int(np.prod(shape[1:]))):
            raise Unsupported(f"{self.node.op_type} to shape {list(shape)} (only [batch, -1])")

    def forward(self, a, x):
        return a.reshape(len(a), -1)

    def on_block(self, v, channels, size, x):
        return v.reshape(len(v), v.shape[1], -1)


@register
class SpatialMean(Elementwise):
    """ReduceMean over the two spatial axes, or GlobalAveragePool."""
    types = ("ReduceMean", "GlobalAveragePool")
    examples = (Example((2, 3, 4, 5), {}, op_type="GlobalAveragePool"),
                Example((2, 3, 4, 5), {}, {"axes": [2, 3], "keepdims": 0}, op_type="ReduceMean"))

    def parse_numpy(self, ctx):  # the axes input, a constant, is read here (roles bind only the input)
        self.bind_numpy(ctx)
        op = self.node.op_type
        axes = self.attrs.get("axes") if len(self.node.input) < 2 else ctx.const.get(self.node.input[1])
        if op == "ReduceMean" and (axes is None or sorted(int(a) % 4 for a in np.ravel(axes)) != [2, 3]):
            raise Unsupported("ReduceMean over axes other than the two spatial ones")
        self.keepdims = op == "GlobalAveragePool" or bool(self.attrs.get("keepdims", 1))

    def forward(self, a, x):
        return a.mean(axis=(2, 3), keepdims=self.keepdims)

    def on_block(self, v, channels, size, x):
        return v.mean(axis=(2, 3), keepdims=True) if self.keepdims else v.mean(axis=(2, 3))[..., None]


def feature_params(p, channels, size, v):
    """The values of a per-feature (per-channel) tensor p at the blocks of `channels`, shaped to broadcast on v."""
    if v.ndim == 4:  # [R, N, H, W] block of a channel
        return p[channels][:, None, None, None]
    cols = channels[:, None] * size + np.arange(size)
    return p[cols][:, None, :]


def take_block(a, channels, shape):
    """The blocks of `channels` of a base activation a [N, ...], shaped like a change v [R, N, ...]."""
    if a.ndim == 4:
        return a[:, channels].transpose(1, 0, 2, 3).reshape(shape)
    size = int(np.prod(shape[2:]))
    cols = channels[:, None] * size + np.arange(size)
    return a[:, cols].transpose(1, 0, 2).reshape(shape)


def splice(a, channels, v):
    """Copies of the base activation a [N, ...] with each copy's block replaced: [R, N, ...]."""
    copies = np.repeat(a[None], len(channels), axis=0)
    r = np.arange(len(channels))
    if a.ndim == 4:
        copies[r, :, channels] = v.reshape(len(r), a.shape[0], *a.shape[2:])
    else:
        size = int(np.prod(v.shape[2:]))
        cols = channels[:, None] * size + np.arange(size)
        copies[r[:, None], :, cols] = v.reshape(len(r), a.shape[0], size).transpose(0, 2, 1)
    return copies


from . import ops_affine, ops_linear  # noqa: E402,F401  the other op classes register themselves
