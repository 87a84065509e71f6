"""Every declared capability of every registered op class, checked against onnxruntime on random inputs, on the
class's own examples: a new op is tested by being registered.

forward: the numpy forward equals onnxruntime's output. propagate: a change in one channel (unit) block of the
input, carried by the op, equals onnxruntime's output on the changed input, at that block. respond: a linear op's
output change equals onnxruntime's difference. block: the perturbed output block of a moved weight element, direct:
the perturbed output copies, device: the kernel graph's copies, each equal onnxruntime's output at the moved
weight."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgezo.runtime.engine.ops import OPS, Context, Mode, splice, take_block
from edgezo.runtime.sessions import make_session

CAPABILITIES = ("forward", "propagate", "respond", "block", "direct", "device")
CLASSES = sorted({cls for cls in OPS.values()}, key=lambda c: c.__name__)
CASES = [(cls, k) for cls in CLASSES for k in range(len(cls.examples))]


class Case:
    """One example of an op class as a one-node ONNX model whose weights are graph inputs (so moved values can be
    fed), the flat params x, and onnxruntime's output at any params."""

    def __init__(self, cls, example, seed=0):
        rng = np.random.default_rng(seed)
        self.cls, self.example = cls, example
        op_type = example.op_type or cls.types[0]
        self.names = ["X", "X2"][:example.inputs]
        roles = list(example.weights)
        node_inputs = self.names + [f"w_{r}" for r in roles]
        if op_type == "Reshape":
            node_inputs.append("shape")
        self.node = helper.make_node(op_type, node_inputs, ["Y"], **example.attrs)
        self.a = {n: rng.standard_normal(example.input_shape).astype(np.float32) for n in self.names}
        self.entries, offset, values = {}, 0, []
        for role, shape in example.weights.items():
            value = rng.standard_normal(shape).astype(np.float32)
            if role == "var":
                value = np.abs(value) + 0.5
            size = int(np.prod(shape))
            self.entries[f"w_{role}"] = {"name": f"w_{role}", "shape": list(shape), "offset": offset, "size": size}
            offset += size
            values.append(value.ravel())
        self.x = np.concatenate(values) if values else np.zeros(1, np.float32)
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node_inputs if n != "shape"]
        inits = [onnx.numpy_helper.from_array(np.array([example.input_shape[0], -1], np.int64), "shape")] \
            if "shape" in node_inputs else []
        graph = helper.make_graph([self.node], "op", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT,
                                                                                          None)], inits)
        self.session = make_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "cpu", 1)
        self.z = self.run(self.x)
        kinds = {n: "data" for n in self.names} | {n: "param" for n in self.entries}
        shapes = {n: a.shape for n, a in self.a.items()} | {"Y": self.z.shape}
        self.ctx = Context({}, self.entries, kinds, shapes, {})
        self.acts = dict(self.a, Y=self.z)

    def run(self, x, a=None):
        feed = dict(a or self.a)
        for name, e in self.entries.items():
            feed[name] = x[e["offset"]:e["offset"] + e["size"]].reshape(e["shape"])
        return self.session.run(None, feed)[0]

    def op(self, mode):
        """The op read from the node in `mode`, or None where this example does not allow it."""
        if mode is Mode.NUMPY:
            op = self.cls.read(self.node, self.ctx)
            if op.mode is not Mode.NUMPY:
                return None
        else:
            op = self.cls(self.node, list(self.names))
            try:
                op.parse_direct(self.ctx)
            except Exception:
                return None
            op.mode = Mode.DIRECT
        op.prepare(1, "cpu")
        return op

    def moved(self, role, elements, deltas):
        """onnxruntime's outputs at params with element e of `role` moved by d, for each (e, d)."""
        e = self.entries[f"w_{role}"]
        outs = []
        for el, d in zip(elements, deltas):
            x = self.x.copy()
            x[e["offset"] + el] += d
            outs.append(self.run(x))
        return np.stack(outs)

    def samples(self, role, rng, count=3):
        size = self.entries[f"w_{role}"]["size"]
        return rng.choice(size, min(count, size), replace=False), rng.standard_normal(min(count, size)).astype(
            np.float32)


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def check_forward(case, op):
    close(op.forward_from(case.acts, case.x), case.z)


def check_propagate(case, op):
    rng = np.random.default_rng(1)
    a = case.a["X"]
    channels = rng.choice(a.shape[1], 2, replace=False)
    shape = (2, a.shape[0]) + (a.shape[2:] if a.ndim == 4 else (1,))
    v = take_block(a, channels, shape) + rng.standard_normal(shape).astype(np.float32)
    out = op.carry(v, "X", channels, int(np.prod(shape[2:])), case.x, case.acts)
    for r, copy in enumerate(splice(a, channels, v)):
        expected = case.run(case.x, dict(case.a, X=copy))
        close(out[r:r + 1], take_block(expected, channels[r:r + 1], out[r:r + 1].shape))


def check_respond(case, op):
    rng = np.random.default_rng(2)
    a = case.a["X"]
    channels = rng.choice(a.shape[1], 2, replace=False)
    shape = (2, a.shape[0]) + (a.shape[2:] if a.ndim == 4 else (1,))
    delta = rng.standard_normal(shape).astype(np.float32)
    change = op.respond(case.x, channels, int(np.prod(shape[2:])), delta)
    for r, copy in enumerate(splice(np.zeros_like(a), channels, delta)):
        close(change[r], case.run(case.x, dict(case.a, X=a + copy)) - case.z)


def check_block(case, op):
    rng = np.random.default_rng(3)
    for role in op.params:
        element, delta = case.samples(role, rng)
        channels, v = op.block(case.a["X"], case.z, case.x, role, element, delta)
        for r, expected in enumerate(case.moved(role, element, delta)):
            close(v[r:r + 1], take_block(expected, np.asarray(channels)[r:r + 1], v[r:r + 1].shape))


def check_direct(case, op):
    rng = np.random.default_rng(4)
    for role in op.params:
        element, delta = case.samples(role, rng)
        close(op.perturbed(case.acts, case.x, role, element, delta), case.moved(role, element, delta))


def check_device(case, op):
    rng = np.random.default_rng(5)
    for role, entry in op.params.items():
        element, delta = case.samples(role, rng)
        nodes = op.kernel(role, tuple(entry["shape"]), case.z.ndim) + [helper.make_node("Add", ["Z0", "move"],
                                                                                        ["copies"])]
        reads = op.kernel_reads()
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("A", "Z", "delta", *reads)]
        inputs.append(helper.make_tensor_value_info("idx", TensorProto.INT64, None))
        graph = helper.make_graph(nodes, "kernel", inputs, [helper.make_tensor_value_info("copies", TensorProto.FLOAT,
                                                                                          None)])
        session = make_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "cpu", 1)
        feed = {"A": case.a["X"], "Z": case.z, "idx": element.astype(np.int64), "delta": delta}
        for name in reads:
            e = case.entries[name]
            feed[name] = case.x[e["offset"]:e["offset"] + e["size"]].reshape(e["shape"])
        close(session.run(None, feed)[0], case.moved(role, element, delta))


CHECKS = {"forward": (Mode.NUMPY, check_forward), "propagate": (Mode.NUMPY, check_propagate),
          "respond": (Mode.NUMPY, check_respond), "block": (Mode.NUMPY, check_block),
          "direct": (Mode.DIRECT, check_direct), "device": (None, check_device)}


@pytest.mark.parametrize("cls,k", CASES, ids=[f"{c.__name__}-{k}" for c, k in CASES])
def test_declared_capabilities_match_onnxruntime(cls, k):
    case = Case(cls, cls.examples[k], seed=k)
    for capability in sorted(cls.supports):
        mode, check = CHECKS[capability]
        op = case.op(mode or Mode.NUMPY) or (case.op(Mode.DIRECT) if mode is None else None)
        if op is None or (capability in ("block", "direct", "device") and not op.params):
            continue
        check(case, op)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_declared_capability_is_exercised(cls):
    """Each capability a class declares applies to at least one of its examples (so the test above ran it)."""
    assert cls.examples, f"{cls.__name__} has no examples"
    assert set(cls.supports) <= set(CAPABILITIES), cls.supports
    for capability in cls.supports:
        mode = CHECKS[capability][0]
        cases = [Case(cls, e, seed=k) for k, e in enumerate(cls.examples)]
        ops = [c.op(mode or Mode.NUMPY) or (c.op(Mode.DIRECT) if mode is None else None) for c in cases]
        if capability in ("block", "direct", "device"):
            ops = [op for op in ops if op is not None and op.params]
        assert any(op is not None for op in ops), f"{cls.__name__} declares {capability!r} but no example applies"


def test_an_unregistered_op_reads_as_opaque():
    from edgezo.runtime.engine.ops import Op
    node = helper.make_node("Sigmoid", ["X"], ["Y"])
    op = OPS.get("Sigmoid", Op).read(node, Context({}, {}, {"X": "data"}, {"X": (2, 3), "Y": (2, 3)}))
    assert op.mode is Mode.OPAQUE and op.reason == "op Sigmoid"
