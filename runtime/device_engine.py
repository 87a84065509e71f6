"""The engine on an accelerator (--device cuda): the same paths as engine.py, with the perturbed-output kernels
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
from onnx import TensorProto, helper, numpy_helper

from .graph import _attrs, reachable
from .layers import Unsupported
from .sessions import make_session

KERNEL_OPS = ("MatMul", "Gemm", "Conv", "Add", "Mul", "LayerNormalization", "BatchNormalization")


def _c(name, value, dtype=np.int64):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype), name))


def _unsq(name, out, axes):
    return [_c(out + "__ax", axes), helper.make_node("Unsqueeze", [name, out + "__ax"], [out])]


def kernel_nodes(node, role, shape, rank, roles):
    """Nodes from A (owner input), Z (owner output), idx [R] int64, delta [R] to copies [R, *Z.shape]."""
    op, attrs = node.op_type, _attrs(node)
    n = _unsq("delta", "dR", list(range(1, rank + 1)))  # delta broadcast over Z's axes: [R, 1, ..., 1]
    n += _unsq("Z", "Z0", [0])
    if op in ("MatMul", "Gemm"):
        rows, cols = shape if len(shape) == 2 else (1, shape[0])
        trans = bool(attrs.get("transB", 0)) or roles.get("transposed", False)
        if role == "bias":
            n += [_c("depth", [cols]), _c("oh_v", [0.0, 1.0], np.float32),
                  helper.make_node("OneHot", ["idx", "depth", "oh_v"], ["E"]),       # [R, out]
                  _c("E_shape", [-1] + [1] * (rank - 1) + [cols]),
                  helper.make_node("Reshape", ["E", "E_shape"], ["E1"]),
                  helper.make_node("Mul", ["E1", "dR"], ["move"])]
        else:
            inner = cols if not trans else shape[1]
            out_n = cols if not trans else rows
            first, second = ("i", "o") if not trans else ("o", "i")
            n += [_c("inner", inner), helper.make_node("Div", ["idx", "inner"], [first]),
                  helper.make_node("Mod", ["idx", "inner"], [second]),
                  helper.make_node("Gather", ["A", "i"], ["col"], axis=-1),           # [N, ..., R]
                  helper.make_node("Transpose", ["col"], ["colT"], perm=[rank - 1] + list(range(rank - 1))),
                  *_unsq("colT", "colU", [rank]),                                     # [R, N, ..., 1]
                  _c("depth", [out_n]), _c("oh_v", [0.0, 1.0], np.float32),
                  helper.make_node("OneHot", ["o", "depth", "oh_v"], ["E"]),
                  _c("E_shape", [-1] + [1] * (rank - 1) + [out_n]),
                  helper.make_node("Reshape", ["E", "E_shape"], ["E1"]),
                  helper.make_node("Mul", ["colU", "E1"], ["m1"]),
                  helper.make_node("Mul", ["m1", "dR"], ["move"])]
    elif op == "Conv":
        o_n = shape[0]
        if role == "bias":
            n += [_c("depth", [o_n]), _c("oh_v", [0.0, 1.0], np.float32),
                  helper.make_node("OneHot", ["idx", "depth", "oh_v"], ["E"]),
                  _c("E_shape", [-1, 1, o_n, 1, 1]), helper.make_node("Reshape", ["E", "E_shape"], ["E1"]),
                  helper.make_node("Mul", ["E1", "dR"], ["move"])]
        else:
            _, c_n, kh, kw = shape
            group = int(attrs.get("group", 1))
            channels = c_n * group
            # flat index o*c*kh*kw + c*kh*kw + p*kw + q -> o, and (input channel, p, q) of a full-C one-hot kernel
            n += [_c("ckk", c_n * kh * kw), _c("kk", kh * kw), _c("per_g", o_n // group), _c("cg", c_n),
                  helper.make_node("Div", ["idx", "ckk"], ["o"]), helper.make_node("Mod", ["idx", "ckk"], ["rest"]),
                  helper.make_node("Div", ["o", "per_g"], ["g"]), helper.make_node("Mul", ["g", "cg"], ["g0"]),
                  helper.make_node("Div", ["rest", "kk"], ["c"]), helper.make_node("Mod", ["rest", "kk"], ["pq"]),
                  helper.make_node("Add", ["g0", "c"], ["ch"]), helper.make_node("Mul", ["ch", "kk"], ["chk"]),
                  helper.make_node("Add", ["chk", "pq"], ["hot"]),
                  _c("kdepth", [channels * kh * kw]), _c("oh_v", [0.0, 1.0], np.float32),
                  helper.make_node("OneHot", ["hot", "kdepth", "oh_v"], ["K0"]),
                  _c("K_shape", [-1, channels, kh, kw]), helper.make_node("Reshape", ["K0", "K_shape"], ["K"]),
                  helper.make_node("Conv", ["A", "K"], ["S"], pads=list(attrs.get("pads", [0, 0, 0, 0])),
                                   strides=list(attrs.get("strides", [1, 1])),
                                   dilations=list(attrs.get("dilations", [1, 1])), kernel_shape=[kh, kw]),
                  helper.make_node("Transpose", ["S"], ["ST"], perm=[1, 0, 2, 3]),  # [R, N, oh, ow]
                  *_unsq("ST", "SU", [2]),
                  _c("depth", [o_n]), helper.make_node("OneHot", ["o", "depth", "oh_v"], ["E"]),
                  _c("E_shape", [-1, 1, o_n, 1, 1]), helper.make_node("Reshape", ["E", "E_shape"], ["E1"]),
                  helper.make_node("Mul", ["SU", "E1"], ["m1"]), helper.make_node("Mul", ["m1", "dR"], ["move"])]
    elif op in ("Add", "Mul"):
        size = int(np.prod(shape))
        n += [_c("depth", [size]), _c("oh_v", [0.0, 1.0], np.float32),
              helper.make_node("OneHot", ["idx", "depth", "oh_v"], ["E"]),
              _c("E_shape", [-1] + [1] * (rank - len(shape)) + list(shape)),
              helper.make_node("Reshape", ["E", "E_shape"], ["E1"]), helper.make_node("Mul", ["E1", "dR"], ["m0"])]
        n += [helper.make_node("Identity", ["m0"], ["move"])] if op == "Add" else \
            [*_unsq("A", "A0", [0]), helper.make_node("Mul", ["m0", "A0"], ["move"])]
    elif op == "LayerNormalization":
        axis = int(attrs.get("axis", -1)) % rank
        eps = float(attrs.get("epsilon", 1e-5))
        size = int(np.prod(shape))
        n += [_c("depth", [size]), _c("oh_v", [0.0, 1.0], np.float32),
              helper.make_node("OneHot", ["idx", "depth", "oh_v"], ["E"]),
              _c("E_shape", [-1] + [1] * axis + list(shape)),
              helper.make_node("Reshape", ["E", "E_shape"], ["E1"]), helper.make_node("Mul", ["E1", "dR"], ["m0"])]
        if role == "bias":
            n += [helper.make_node("Identity", ["m0"], ["move"])]
        else:
            n += [_c("ones", np.ones(shape), np.float32), _c("zeros", np.zeros(shape), np.float32),
                  helper.make_node("LayerNormalization", ["A", "ones", "zeros"], ["xhat"], axis=axis, epsilon=eps),
                  *_unsq("xhat", "xhat0", [0]), helper.make_node("Mul", ["m0", "xhat0"], ["move"])]
    elif op == "BatchNormalization":  # channel idx of the output recomputed with the moved statistic
        channels = shape[0]
        tail = [1] * (rank - 2)
        n += [_c("pshape", [-1, 1] + tail), helper.make_node("Transpose", ["Ac0"], ["Ac"], perm=[1, 0] + list(
            range(2, rank))), helper.make_node("Gather", ["A", "idx"], ["Ac0"], axis=1),
              helper.make_node("Gather", ["Z", "idx"], ["Zc0"], axis=1),
              helper.make_node("Transpose", ["Zc0"], ["Zc"], perm=[1, 0] + list(range(2, rank)))]
        for k, (r, name) in enumerate(zip(("scale", "bias", "mean", "var"), node.input[1:5])):
            n += [helper.make_node("Gather", [name, "idx"], [f"{r}_g"])]
            n += [helper.make_node("Add", [f"{r}_g", "delta"], [f"{r}_m"])] if r == role else \
                [helper.make_node("Identity", [f"{r}_g"], [f"{r}_m"])]
            n += [helper.make_node("Reshape", [f"{r}_m", "pshape"], [f"{r}_r"])]
        n += [_c("eps", [float(attrs.get("epsilon", 1e-5))], np.float32),
              helper.make_node("Add", ["var_r", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
              helper.make_node("Sub", ["Ac", "mean_r"], ["cen"]), helper.make_node("Div", ["cen", "sd"], ["nrm"]),
              helper.make_node("Mul", ["nrm", "scale_r"], ["scl"]), helper.make_node("Add", ["scl", "bias_r"], ["new"]),
              helper.make_node("Sub", ["new", "Zc"], ["diff0"]), *_unsq("diff0", "diff", [2]),
              _c("depth", [channels]), _c("oh_v", [0.0, 1.0], np.float32),
              helper.make_node("OneHot", ["idx", "depth", "oh_v"], ["E"]),
              _c("E_shape", [-1, 1, channels] + tail), helper.make_node("Reshape", ["E", "E_shape"], ["E1"]),
              helper.make_node("Mul", ["diff", "E1"], ["move"])]
    else:
        raise Unsupported(f"no kernel graph for {op}")
    return n + [helper.make_node("Add", ["Z0", "move"], ["copies"])]


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


class DeviceEngine:
    """Wraps a built GraphEngine (its graph reading, paths and suffix cuts) and evaluates on `device`."""

    def __init__(self, engine, device="cuda"):
        self.engine, self.device = engine, device
        self.manifest, self.sub = engine.manifest, engine.cuts
        self.per_sample = self.manifest["loss"].get("per_sample")
        self._fused, self._params, self._need = {}, None, {}
        self.opset = max(17, next(o.version for o in engine.cuts.model.opset_import if o.domain in ("", "ai.onnx")))
        self.paths = {}
        for j, layer in enumerate(engine.layers):
            if layer.params:
                kernel = layer.node.op_type in KERNEL_OPS and not engine.paths[j].startswith("generic") and \
                    (getattr(layer, "transposed", False) or
                     all(e["name"] in layer.node.input for e in layer.params.values()))
                self.paths[j] = ("device: " if kernel else "generic: ") + layer.node.op_type

    def tensor_paths(self):
        return {e["name"]: self.paths[j] for j, layer in enumerate(self.engine.layers) for e in layer.params.values()}

    def fused(self, j, role, shapes):
        """One session: A, Z, extras (base), idx, delta, target -> the R losses of the perturbed copies."""
        key = (j, role)
        if key not in self._fused:
            layer = self.engine.layers[j]
            node, entry = layer.node, layer.params[role]
            start = node.output[0]
            suffix, extra = self.engine.suffix_model(start)
            rank = len(shapes[start])
            kernel = kernel_nodes(node, role, tuple(entry["shape"]), rank,
                                  {"transposed": bool(getattr(layer, "transposed", False))})
            graph = suffix.graph  # its inputs (start, extras, target) are made here from the "__base" inputs
            f32 = TensorProto.FLOAT
            nodes = [helper.make_node("Shape", ["idx"], ["R"]), helper.make_node("Shape", ["Z"], ["Zs"]),
                     _c("neg1", [-1]), _c("z1", [1]), _c("big", [1 << 30]),
                     helper.make_node("Slice", ["Zs", "z1", "big"], ["Ztail"]),
                     helper.make_node("Concat", ["neg1", "Ztail"], ["flat_shape"], axis=0)]
            for k, e in enumerate(extra):  # base activations tiled R times along the batch
                nodes += [_c(f"ones{k}", [1] * (len(shapes[e]) - 1)),
                          helper.make_node("Concat", ["R", f"ones{k}"], [f"rep{k}"], axis=0)]
            nodes += kernel
            reads = [n for n in node.input[1:] if n] if node.op_type == "BatchNormalization" else []
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
                nodes += _prefixed([_c("t__ones", [1] * (tr - 1)), helper.make_node("Concat", ["R", "t__ones"],
                                                                                     ["t__rep"], axis=0)], set())
                nodes += [helper.make_node("Tile", [target + "__base", "k__t__rep"], [target])]
                nodes += list(loss.graph.node)
                mean = helper.make_node("ReduceMean", ["k__per_copy", "k__z1"], ["losses__R"], keepdims=0) \
                    if self.opset >= 18 else \
                    helper.make_node("ReduceMean", ["k__per_copy"], ["losses__R"], axes=[1], keepdims=0)
                nodes += [helper.make_node("Concat", ["k__R", "k__neg1"], ["k__RN"], axis=0),
                          helper.make_node("Reshape", [self.per_sample, "k__RN"], ["k__per_copy"]), mean]
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

    def losses(self, params, probe, inputs, targets):
        import onnxruntime as ort
        engine = self.engine
        x = np.ascontiguousarray(params, np.float32)
        a0 = np.ascontiguousarray(inputs[engine.input_name], np.float32)
        y = targets[engine.target_name]
        if self._params is None:
            self._params = ort.OrtValue.ortvalue_from_numpy(x, self.device, 0)
        else:
            self._params.update_inplace(x)
        owners = engine.owner[probe.index]
        names = sorted({engine.output} | {n for j in np.unique(owners) for n in self._needs(j)} - {engine.input_name})
        acts = self._base(names, a0)
        out = np.empty(len(probe))
        base_rows = probe.delta == 0
        if base_rows.any():
            out[base_rows] = engine.sample_losses(acts[engine.output].numpy(), y).mean()
        rows = np.flatnonzero(~base_rows)
        for j in np.unique(owners[rows]):
            sel = rows[owners[rows] == j]
            layer = engine.layers[j]
            if not self.paths[j].startswith("device"):
                feed = {k: v.numpy() for k, v in acts.items()}
                feed[engine.input_name] = a0
                out[sel] = engine._generic_losses(layer, x, feed, probe.index[sel],
                                                  probe.delta[sel].astype(np.float32), y)
                continue
            for role, entry in layer.params.items():
                mine = sel[(probe.index[sel] >= entry["offset"]) & (probe.index[sel] < entry["offset"] + entry["size"])]
                chunk = int(max(1, engine.memory_bytes // (16 * engine.sample_bytes * len(a0) + 1)))
                for s in range(0, len(mine), chunk):  # copies of a call stay under --engine-memory-mb
                    part = mine[s:s + chunk]
                    out[part] = self._tensor_losses(j, role, acts, a0, probe.index[part] - entry["offset"],
                                                    probe.delta[part].astype(np.float32), y)
        return out

    def _needs(self, j):
        layer = self.engine.layers[j]
        if not self.paths[j].startswith("device"):
            return self.engine.needs(j)
        if j not in self._need:
            self._need[j] = {layer.inputs[0], layer.output} | set(self.engine.suffix_model(layer.output)[1])
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
        layer = self.engine.layers[j]
        shapes = {name: v.shape() for name, v in acts.items()}
        shapes[self.engine.target_name] = y.shape
        session, extra = self.fused(j, role, shapes)
        binding = session.io_binding()
        binding.bind_ortvalue_input(self.manifest["params_input"], self._params)
        binding.bind_ortvalue_input("A", acts[layer.inputs[0]])
        binding.bind_ortvalue_input("Z", acts[layer.output])
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
