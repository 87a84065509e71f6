"""The engine on an accelerator (--device cuda): the same paths as core.py, with the perturbed-output kernels
written as small ONNX graphs so that params, activations and copies stay in the execution provider's memory.

Per step: the flat params go to the device once (an OrtValue updated in place), the base run of the cut
subgraph leaves the activations there (IOBinding), and per trainable tensor one fused session computes
kernel (copies of the owner's output for R perturbations) -> the rest of the graph on the copies stacked on
the batch axis -> the graph's per-sample losses -> their mean per copy: only the batch goes in and the R
losses come out. Owners without a kernel graph (BatchNormalization, ops behind Identity/Transpose chains,
shared tensors) take the generic path: one call per perturbation from the owner's inputs, params moved.
Runs on any provider; the tests run it on the CPU provider against the naive path.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper

from ..loss import reduce_mean
from ..sessions import make_session
from .graph import reachable
from .ops import Mode, const_node
from .step import Path, Route, StepEngine


def _prefixed(nodes, keep):
    """The nodes with every tensor name not in `keep` prefixed "k__" (no clash with the model's names)."""
    def ren(name):
        return name if not name or name in keep else "k__" + name
    for node in nodes:
        node.input[:] = [ren(i) for i in node.input]
        node.output[:] = [ren(o) for o in node.output]
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                a.t.name = ren(a.t.name)
    return nodes


class DeviceEngine(StepEngine):
    """Wraps a built GraphEngine (its graph reading, routes and suffix cuts) and evaluates on `device`."""

    def __init__(self, engine, device="cuda"):
        self.engine, self.device, self.ops = engine, device, engine.ops
        self.manifest, self.sub = engine.manifest, engine.cuts
        self.owner, self.input_name, self.target_name = engine.owner, engine.input_name, engine.target_name
        self.input_dtype = engine.input_dtype
        self.memory_bytes, self.sample_bytes = engine.memory_bytes, engine.sample_bytes
        self.sample_losses = engine.sample_losses
        self.per_sample = self.manifest["loss"].get("per_sample")
        self._fused, self._params, self._need = {}, None, {}
        self.opset = max(17, next(o.version for o in engine.cuts.model.opset_import if o.domain in ("", "ai.onnx")))
        self.routes = {}
        for j in engine.routes:
            op = self.ops[j]
            kernel = "device" in op.supports and op.mode is not Mode.OPAQUE and \
                engine.routes[j].path is not Path.GENERIC and \
                (op.transposed or all(e["name"] in op.node.input for e in op.params.values()))
            self.routes[j] = Route(Path.DEVICE if kernel else Path.GENERIC, op.node.op_type)

    def fused(self, j, role, shapes):
        """One session: A, Z, extras (base), idx, delta, target -> the R losses of the perturbed copies."""
        key = (j, role)
        if key not in self._fused:
            op = self.ops[j]
            node, entry = op.node, op.params[role]
            start = node.output[0]
            suffix, extra = self.engine.suffix_model(start)
            kernel = op.kernel(role, tuple(entry["shape"]), len(shapes[start]))
            kernel.append(helper.make_node("Add", ["Z0", "move"], ["copies"]))
            graph = suffix.graph  # its inputs (start, extras, target) are made here from the "__base" inputs
            f32 = TensorProto.FLOAT
            nodes = [helper.make_node("Shape", ["idx"], ["R"]), helper.make_node("Shape", ["Z"], ["Zs"]),
                     const_node("neg1", [-1]), const_node("z1", [1]), const_node("big", [1 << 30]),
                     helper.make_node("Slice", ["Zs", "z1", "big"], ["Ztail"]),
                     helper.make_node("Concat", ["neg1", "Ztail"], ["flat_shape"], axis=0)]
            for k, e in enumerate(extra):  # base activations tiled R times along the batch
                nodes += [const_node(f"ones{k}", [1] * (len(shapes[e]) - 1)),
                          helper.make_node("Concat", ["R", f"ones{k}"], [f"rep{k}"], axis=0)]
            nodes += kernel
            reads = op.kernel_reads()
            nodes = _prefixed(nodes, {"A", "Z", "idx", "delta", *reads})
            made = {o for g_node in graph.node for o in g_node.output}
            graph_nodes, seen = reachable(self.sub.model.graph, reads, [self.manifest["params_input"]])
            nodes = [g_node for g_node in graph_nodes if not made & set(g_node.output)] + nodes  # the statistics
            nodes += [helper.make_node("Reshape", ["k__copies", "k__flat_shape"], [start])]
            nodes += [helper.make_node("Tile", [e + "__base", f"k__rep{k}"], [e]) for k, e in enumerate(extra)]
            target = self.engine.target_name
            nodes += list(graph.node)
            if self.per_sample:
                loss = self.engine.loss_model
                tr = len(shapes[target])
                nodes += _prefixed([const_node("t__ones", [1] * (tr - 1)), helper.make_node("Concat", ["R", "t__ones"],
                                                                                     ["t__rep"], axis=0)], set())
                nodes += [helper.make_node("Tile", [target + "__base", "k__t__rep"], [target])]
                nodes += list(loss.graph.node)
                nodes += [helper.make_node("Concat", ["k__R", "k__neg1"], ["k__RN"], axis=0),
                          helper.make_node("Reshape", [self.per_sample, "k__RN"], ["k__per_copy"])]
                nodes += reduce_mean("k__per_copy", "losses__R", [1], self.opset, prefix="k__")  # the loss per copy
                outputs = [helper.make_tensor_value_info("losses__R", f32, None)]
                extra_inits = list(loss.graph.initializer)
            else:
                outputs = [helper.make_tensor_value_info(self.engine.output, f32, None)]
                extra_inits = []
            inits, names = [], set()
            for t in list(graph.initializer) + extra_inits + [t for t in self.sub.model.graph.initializer
                                                               if t.name in seen]:
                if t.name not in names:
                    inits.append(t)
                    names.add(t.name)
            params = self.manifest["params_input"]
            inputs = [helper.make_tensor_value_info(params, f32, [self.manifest["num_params"]]),
                      helper.make_tensor_value_info("A", f32, None), helper.make_tensor_value_info("Z", f32, None),
                      helper.make_tensor_value_info("idx", TensorProto.INT64, [None]),
                      helper.make_tensor_value_info("delta", f32, [None])]
            inputs += [helper.make_tensor_value_info(e + "__base", f32, None) for e in extra]
            if self.per_sample:
                dtype = TensorProto.INT64 if self.manifest["targets"][0]["dtype"] == "int64" else f32
                inputs.append(helper.make_tensor_value_info(target + "__base", dtype, None))
            model = helper.make_model(helper.make_graph(nodes, "fused", inputs, outputs, inits),
                                      opset_imports=[helper.make_opsetid("", self.opset)],
                                      ir_version=max(8, suffix.ir_version))
            model.opset_import.extend([o for o in suffix.opset_import if o.domain not in ("", "ai.onnx")])
            self._fused[key] = (make_session(model, self.device, self.sub.threads, arena=False), extra)
        return self._fused[key]

    def base(self, x, a0, owners):
        """The base activations, left on the device (OrtValues); the params go there once per step."""
        import onnxruntime as ort
        if self._params is None:
            self._params = ort.OrtValue.ortvalue_from_numpy(x, self.device, 0)
        else:
            self._params.update_inplace(x)
        names = sorted({self.engine.output} | {n for j in owners for n in self._needs(j)} - {self.input_name})
        return self._base(names, a0)

    def scores(self, acts):
        return acts[self.engine.output].numpy()

    def owner_losses(self, j, x, acts, a0, index, delta, y):
        if self.routes[j].path is not Path.DEVICE:
            feed = {k: v.numpy() for k, v in acts.items()}
            feed[self.input_name] = a0
            return self.engine._generic_losses(self.ops[j], x, feed, index, delta, y)
        out = np.empty(len(index))
        for role, entry, mine in self.roles_of(self.ops[j], index):
            out[mine] = self._tensor_losses(j, role, acts, a0, index[mine] - entry["offset"], delta[mine], y)
        return out

    def _needs(self, j):
        op = self.ops[j]
        if self.routes[j].path is not Path.DEVICE:
            return self.engine.needs(j)
        if j not in self._need:
            self._need[j] = {op.inputs[0], op.output} | set(self.engine.suffix_model(op.output)[1])
        return self._need[j]

    def _base(self, names, a0):
        """The base activations, left on the device (OrtValues)."""
        session = self.sub.session(names)
        binding = session.io_binding()
        binding.bind_ortvalue_input(self.manifest["params_input"], self._params)
        binding.bind_cpu_input(self.engine.input_name, a0)
        for name in names:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        values = dict(zip(names, binding.get_outputs()))
        if self.engine.input_name not in values:
            import onnxruntime as ort
            values[self.engine.input_name] = ort.OrtValue.ortvalue_from_numpy(a0, self.device, 0)
        return values

    def _tensor_losses(self, j, role, acts, a0, element, delta, y):
        op = self.ops[j]
        shapes = {name: v.shape() for name, v in acts.items()}
        shapes[self.engine.target_name] = y.shape
        session, extra = self.fused(j, role, shapes)
        binding = session.io_binding()
        binding.bind_ortvalue_input(self.manifest["params_input"], self._params)
        binding.bind_ortvalue_input("A", acts[op.inputs[0]])
        binding.bind_ortvalue_input("Z", acts[op.output])
        for name in extra:
            binding.bind_ortvalue_input(name + "__base", acts[name])
        binding.bind_cpu_input("idx", np.ascontiguousarray(element, np.int64))
        binding.bind_cpu_input("delta", np.ascontiguousarray(delta, np.float32))
        if self.per_sample:
            binding.bind_cpu_input(self.engine.target_name + "__base", np.ascontiguousarray(y))
        out_name = session.get_outputs()[0].name
        binding.bind_output(out_name, "cpu")
        session.run_with_iobinding(binding)
        result = binding.copy_outputs_to_cpu()[0]
        if self.per_sample:
            return result.astype(np.float64)
        n = len(a0)
        return self.engine.sample_losses(result, np.tile(y, (len(element),) + (1,) * (y.ndim - 1))).reshape(
            len(element), n).mean(axis=1)
