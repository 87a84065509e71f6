"""The evaluation engine: all losses of a coordinate probe for a fraction of 2B forward passes.

loss.onnx is read once into a graph of numpy layers (Gemm, MatMul, bias Add, Conv, Relu, MaxPool,
BatchNormalization in inference form, Flatten/Reshape, spatial ReduceMean/GlobalAveragePool, and
the Add of two activations that joins a residual branch). Tensors computed from shapes only (the
zero conv biases and batch-size Reshapes of the torch exporter) are folded at build time. Per step:

1. prefix reuse: one base forward caches every layer's output (one onnxruntime call for graphs with
   convolutions, numpy for Gemm-only graphs, where that is faster);
2. a perturbed weight or bias changes one output unit or channel of its layer (a "block"): it is
   computed directly (eps times one input column, or one shifted input map);
3. delta propagation: while the changed tensor has one consumer, per-channel ops (Relu, MaxPool,
   BatchNorm, bias, Flatten, spatial mean, a residual Add with the other input at its base value)
   keep the change in that block; the next Gemm/Conv is linear, so its output is the cached base
   output plus a one-column (one-input-channel) product of the change;
4. only the layers that depend on the changed tensor run densely on the copies (a skip branch that
   does not keeps its base value), chunked under a memory cap.
If the block reaches the model output, the loss follows in O(batch x outputs) per copy.

`propagate=False` skips step 3 (the "batched" level: the perturbed layer's full output goes through
the rest of the network). The frozen part (what no trainable tensor reaches) runs in the base onnxruntime
call whatever its ops. Per trainable tensor: where ops without numpy code (layers.Opaque) lie downstream,
onnxruntime runs that part on the copies stacked on the batch axis ("stacked"); where the owner op itself
has none, or the stacked part mixes samples, onnxruntime runs from the op's input per perturbation
("generic"). Custom losses raise Unsupported and the caller uses the naive path.
"""
import numpy as np
import onnx
from onnx import numpy_helper

from .direct import Direct, make_direct
from .graph import _ROLES, Subgraphs, _ancestors, _attrs, _kinds, _tainted, cut, subgraph_inputs
from .layers import (BatchNorm, Bias, Conv, Flatten, Gemm, MaxPool, Opaque, Relu, SpatialMean, Sum,
                     Unsupported, per_sample_losses, scores_name)
from .sessions import make_session
from .optim import CoordinateProbe


def _first_inputs(ops, graph, kinds):
    """The activation inputs of `ops` (in graph order) that do not depend on an earlier one of them."""
    starts, reached = [], set()
    order = {id(node): k for k, node in enumerate(graph.node)}
    for op in sorted({id(o): o for o in ops}.values(), key=lambda o: order[id(o)]):
        for name in op.input:
            if kinds.get(name) == "data" and name not in reached:
                starts.append(name)
                reached.add(name)
                for node in graph.node:
                    if any(n in reached for n in subgraph_inputs(node)):
                        reached.update(node.output)
    return starts


class GraphEngine:
    """Exact fast losses for coordinate probes on a loss graph of the ops above (chains and residual DAGs)."""

    def __init__(self, layers, manifest, propagate=True, memory_mb=256, subgraphs=None, sample_bytes=0):
        self.layers, self.manifest, self.subgraphs = layers, manifest, subgraphs
        self.sample_bytes = sample_bytes  # the widest activation of one sample, in bytes
        self.propagate, self.memory_bytes = propagate, memory_mb * 2 ** 20
        self.kind, self.loss_session = manifest["loss"]["kind"], None
        self.input_name = manifest["inputs"][0]["name"]
        self.target_name = manifest["targets"][0]["name"]
        self.output = scores_name(manifest)
        self.owner = np.empty(manifest["num_params"], np.int64)  # flat index -> layer index
        for j, layer in enumerate(layers):
            for entry in layer.params.values():
                self.owner[entry["offset"]:entry["offset"] + entry["size"]] = j
        self.consumers = {}
        for layer in layers:
            for name in layer.inputs:
                self.consumers.setdefault(name, []).append(layer)
        self._downstream, self._needs = {}, {}
        # per layer that owns trainable tensors: its path ("engine", "stacked: <ops>" where ops without numpy
        # code lie downstream and onnxruntime runs that part on copies stacked on the batch axis, or
        # "generic: <ops>" where the owner itself has no kernel or the stacked part mixes samples: onnxruntime
        # from the owner's input, one call per perturbation, the frozen part not rerun)
        self.paths, self._suffixes = {}, {}
        for j, layer in enumerate(layers):
            if layer.params:
                blocked = [later for later, _ in self.downstream(layer.output) if isinstance(later, Opaque)]
                ops = ", ".join(sorted({b.node.op_type for b in blocked}))
                if isinstance(layer, Opaque) and not isinstance(layer, Direct):
                    self.paths[j] = f"generic: {layer.node.op_type} ({layer.reason})"
                else:
                    self.paths[j] = f"stacked: {ops}" if blocked else "engine"

    def sample_losses(self, scores, y):
        """Per-sample losses [P] (float64) of scores [P, ...] and targets y [P, ...]: the loss graph's own
        per-sample output (format 2) by a session from the scores, or for a built-in kind numpy's formula where
        build() found it equal to the graph's (format 1 artifacts: numpy's formula)."""
        if self.loss_session is None:
            y = y.astype(np.int64) if self.kind == "cross_entropy" else y.astype(np.float64)
            return per_sample_losses(scores, y, self.kind)
        feed = {self.output: np.ascontiguousarray(scores), self.target_name: y}
        return self.loss_session.run(None, feed)[0].astype(np.float64)

    def check_loss(self, subgraphs, scores, rng):
        """Format 2: the per-sample losses come from the loss graph; numpy's formula of a built-in kind is used
        instead only where it gives the graph's values on a probe batch (1e-5 relative)."""
        name = self.manifest["loss"].get("per_sample")
        if name is None:
            return
        model = self.loss_model = cut(subgraphs.model, [self.output, self.target_name], [name])
        session = make_session(model, subgraphs.device, subgraphs.threads, arena=False)
        self.loss_session = session
        if self.kind in ("mse", "cross_entropy", "binary_cross_entropy"):
            y = rng.integers(0, scores.shape[-1], len(scores)) if self.kind == "cross_entropy" else \
                rng.random(scores.shape).astype(np.float32)
            graph = self.sample_losses(scores, y)
            self.loss_session = None
            if not np.allclose(self.sample_losses(scores, y), graph, rtol=1e-5, atol=1e-6):
                self.loss_session = session

    def tensor_paths(self):
        """{trainable tensor: "engine", "stacked: <ops>" or "generic: <ops>"}."""
        return {entry["name"]: self.paths[j] for j, layer in enumerate(self.layers) for entry in layer.params.values()}

    def dense_start(self, t):
        """Where the dense part begins for a change of tensor t (see _propagate)."""
        for layer in self._sparse_path(t):
            t = layer.output
        return t

    def start_of(self, j):
        """Where the dense part begins for perturbations of layer j's parameters."""
        layer = self.layers[j]
        return layer.output if isinstance(layer, Direct) else self.dense_start(layer.output)

    def suffix_model(self, start):
        """(the cut of loss.onnx from `start` (a name, or a tuple of names) to the loss's scores, names of the
        other activations it reads). Values computed from the batch size (Shape) are recomputed from the
        activations they read, so that a stacked batch gets its own size."""
        starts = (start,) if isinstance(start, str) else tuple(start)
        graph = self.cuts.model.graph
        after, nodes = set(starts), []
        for node in graph.node:
            if any(n in after for n in subgraph_inputs(node)):
                nodes.append(node)
                after.update(node.output)
        inits = {t.name for t in graph.initializer}
        producer = {o: node for node in graph.node for o in node.output}
        stack = [n for node in nodes for n in subgraph_inputs(node) if n not in after and n not in inits]
        extra, seen = set(), set()
        while stack:  # params and constants: cut computes them
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if self.kinds.get(name) == "data":
                extra.add(name)
            elif self.kinds.get(name) == "batch" and name in producer:
                stack += [n for n in subgraph_inputs(producer[name]) if n not in inits]
        extra = sorted(extra)
        return cut(self.cuts.model, [self.manifest["params_input"], *starts] + extra, [self.output]), extra

    def suffix(self, start):
        """(onnxruntime session of suffix_model(start), names of the other activations it reads)."""
        starts = (start,) if isinstance(start, str) else tuple(start)
        if starts not in self._suffixes:
            model, extra = self.suffix_model(starts)
            self._suffixes[starts] = (make_session(model, self.cuts.device, self.cuts.threads, arena=False),
                                      extra)
        return self._suffixes[starts]

    def run_suffix(self, start, rows, acts, sample, x):
        """Scores of the changed (copy, sample) rows [k, ...] of `start`, stacked on the batch axis; the other
        activations the suffix reads are the base ones of the same samples."""
        session, extra = self.suffix(start)
        feed = {self.manifest["params_input"]: x, start: np.ascontiguousarray(rows)}
        for name in extra:
            feed[name] = acts[name][sample]
        return session.run(None, feed)[0]

    def check_stacking(self, a0):
        """Each stacked suffix must treat samples independently: a run on two different stacked copies must
        equal separate runs (training-mode BatchNorm, batch reductions and batch sizes baked into a Reshape
        fail this). Layers whose suffix fails take the generic path, and the path says why."""
        x = np.zeros(self.manifest["num_params"], np.float32)
        for j, path in list(self.paths.items()):
            if not path.startswith("stacked"):
                continue
            start = self.start_of(j)
            extra = self.suffix(start)[1]
            acts = self.subgraphs.run(sorted({start, self.output} | set(extra)), x, a0)
            n = len(a0)
            other = acts[start] * np.float32(0.5) + np.float32(0.25)
            both = np.concatenate([acts[start], other])
            try:
                stacked = self.run_suffix(start, both, acts, np.concatenate([np.arange(n), np.arange(n)]), x)[:n]
                alone = self.run_suffix(start, acts[start], acts, np.arange(n), x)
                ok = stacked.shape == alone.shape and np.allclose(stacked, alone, rtol=1e-4, atol=1e-5)
            except Exception:  # onnxruntime refusing the stacked batch (a batch size baked into a shape)
                ok = False
            if not ok:
                self.paths[j] = "generic: " + path[len("stacked: "):] + " (mixes samples or fixes the batch size)"

    @classmethod
    def build(cls, model_path, manifest, propagate=True, memory_mb=256, threads=None, device="cpu"):
        """The engine for loss.onnx at model_path; raises Unsupported where an op or pattern is not handled."""
        model = onnx.load(str(model_path))
        if manifest["loss"]["kind"] not in ("mse", "cross_entropy", "binary_cross_entropy") and \
                not manifest["loss"].get("per_sample"):
            raise Unsupported(f"loss kind {manifest['loss']['kind']!r} without a per-sample output (export the loss "
                              "with reduction 'none', one value per sample)")
        if len(manifest["inputs"]) != 1 or len(manifest["targets"]) != 1:
            raise Unsupported("more than one input or target")
        graph = model.graph
        entries = {e["name"]: e for e in manifest["trainable"]}
        const = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                attrs = _attrs(node)
                const[node.output[0]] = numpy_helper.to_array(attrs["value"]) if "value" in attrs \
                    else np.array(attrs.get("value_ints"))
        kinds = _kinds(graph, const, manifest["params_input"], manifest["inputs"][0]["name"])
        output = scores_name(manifest)
        nodes = _ancestors([n for n in graph.node if kinds[n.output[0]] == "data"], kinds, output)
        # the frozen part (data nodes that no trainable tensor reaches) runs once per step in onnxruntime,
        # any op; only the nodes downstream of a trainable tensor become numpy layers
        tainted = _tainted(graph, manifest["params_input"])
        frozen = [node for node in nodes if node.output[0] not in tainted]
        nodes = [node for node in nodes if node.output[0] in tainted]
        folded = sorted({n for node in nodes for n in node.input[1:]
                         if n and kinds.get(n) == "static" and n not in const and n not in entries})
        # one run at a dummy batch of 2 (zeros): the folded tensors' values and every activation's shape
        subgraphs = Subgraphs(model, manifest, threads, device=device, keep=2)
        outs = [node.output[0] for node in nodes]
        frozen_in = sorted({n for node in nodes for n in node.input if kinds.get(n) == "data"} - set(outs)
                           - {manifest["inputs"][0]["name"]})
        probe = subgraphs.run(folded + outs + frozen_in, np.zeros(manifest["num_params"], np.float32),
                              np.zeros([2] + list(manifest["inputs"][0]["shape"][1:]), np.float32))
        const.update({n: probe[n] for n in folded})
        param_deps = {name: {name} for name in entries}  # tensor -> the trainable tensors it is computed from
        for node in graph.node:
            deps = set().union(*(param_deps.get(n, ()) for n in node.input))
            if deps and kinds.get(node.output[0]) == "param":
                param_deps.update({out: deps for out in node.output})
        used, layers = set(), []
        shapes = {name: value.shape for name, value in probe.items()}
        shapes[manifest["inputs"][0]["name"]] = (2, *manifest["inputs"][0]["shape"][1:])
        producer = {o: node for node in graph.node for o in node.output}
        readers = {}  # trainable tensor -> the ops that read it (directly or through Identity, Transpose, ...)
        for node in nodes:
            for name in {t for n in node.input for t in param_deps.get(n, ())}:
                readers.setdefault(name, []).append(node)
        for node in nodes:  # an op without numpy code becomes Opaque: only the tensors it affects go naive
            data = list(dict.fromkeys(n for n in subgraph_inputs(node) if kinds.get(n) == "data"))
            reads = sorted({t for n in node.input for t in param_deps.get(n, ())})
            shared = [t for t in reads if len(readers[t]) > 1]
            if shared:  # the generic path from the inputs of every op that reads them
                owned = [t for t in reads if t not in used]
                layer = Opaque(node, {}, {f"t{i}": entries[name] for i, name in enumerate(owned)}, data)
                layer.starts = _first_inputs([r for t in owned for r in readers[t]], graph, kinds)
                layer.reason = f"{shared[0]!r} is read by {len(readers[shared[0]])} ops"
                used.update(owned)
                layers.append(layer)
                continue
            before = set(used)
            try:
                layer = cls._layer(node, const, entries, used, kinds)
                if isinstance(layer, Flatten) and probe[layer.output].shape != (2, probe[layer.output][0].size):
                    raise Unsupported(f"{node.op_type} to shape {list(probe[layer.output].shape)} (only [batch, -1])")
                if isinstance(layer, (Gemm, Bias)) and probe[layer.output].ndim != 2:
                    raise Unsupported(f"{node.op_type} on activations of rank {probe[layer.output].ndim}")
            except Unsupported as e:
                used.intersection_update(before)
                try:  # its perturbed output computed directly, then the rest of the graph on the copies
                    layer = make_direct(node, entries, used, kinds, shapes, producer)
                except Unsupported:  # the generic path: onnxruntime from its inputs, per perturbation
                    layer = Opaque(node, {}, {f"t{i}": entries[name] for i, name in enumerate(reads)}, data)
                    layer.starts = data
                    used.update(reads)
                layer.reason = str(e)
            layers.append(layer)
        if set(entries) - used:
            raise Unsupported(f"trainable tensors outside the graph's data path: {sorted(set(entries) - used)[:3]}")
        convs = [layer for layer in layers if isinstance(layer, Conv)]
        for layer in convs:
            layer.make_session(threads, device)
        # Convolutions run much faster in onnxruntime; for Gemm-only graphs numpy's forward is faster
        # than a session call (measured: SARCOS MLP 3.4 vs 4.3 ms per step)
        base = subgraphs if convs or frozen or any(isinstance(layer, Opaque) for layer in layers) else None
        widest = max(probe[layer.output].nbytes // 2 for layer in layers)
        engine = cls(layers, manifest, propagate, memory_mb, base, widest)
        engine.kinds, engine.cuts = kinds, subgraphs  # cuts: the cut-subgraph factory even where the base is numpy
        rng = np.random.default_rng(0)
        a0 = rng.standard_normal([3] + list(manifest["inputs"][0]["shape"][1:])).astype(np.float32)
        engine.check_stacking(a0)
        engine.check_loss(subgraphs, probe[output] + rng.standard_normal(probe[output].shape).astype(np.float32), rng)
        subgraphs.sessions.clear()  # the build's sessions (each holds the frozen weights) are not the steps'
        return engine

    @staticmethod
    def _layer(node, const, entries, used, kinds):
        op, attrs = node.op_type, _attrs(node)
        data = [n for n in node.input if kinds.get(n) == "data"]
        if op == "Add" and len(data) == 2:
            return Sum(node, {}, {}, data)
        if len(data) != 1 or node.input[0] != data[0]:
            raise Unsupported(f"{op} {node.output[0]!r} with activation inputs {list(node.input)}")
        roles = _ROLES.get(op, ("input",))
        params, consts = {}, {}
        for role, name in zip(roles[1:], node.input[1:]):
            if name in entries:
                if name in used:
                    raise Unsupported(f"tensor {name!r} is used twice")
                params[role] = entries[name]
                used.add(name)
            elif name in const:
                consts[role] = const[name].astype(np.float32)
            else:
                raise Unsupported(f"{op} input {name!r} is neither a parameter nor a constant")
        if op == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                raise Unsupported("Gemm with transA, alpha or beta")
            layer = Gemm(node, consts, params, data)
            layer.trans_b = bool(attrs.get("transB", 0))
        elif op == "MatMul":
            layer = Gemm(node, consts, params, data)
            layer.trans_b = False
        elif op == "Conv":
            if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1])):
                raise Unsupported("grouped or dilated Conv")
            if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise Unsupported("Conv auto_pad")
            layer = Conv(node, consts, params, data)
            layer.stride = tuple(attrs.get("strides", [1, 1]))
            layer.pads = tuple(attrs.get("pads", [0, 0, 0, 0]))
            weight = params.get("weight", {}).get("shape") or consts["weight"].shape
            layer.kernel = tuple(attrs.get("kernel_shape", weight[2:]))
        elif op == "Relu":
            layer = Relu(node, consts, params, data)
        elif op == "MaxPool":
            if any(attrs.get("pads", [0] * 4)) or attrs.get("ceil_mode", 0) or \
                    any(d != 1 for d in attrs.get("dilations", [1, 1])):
                raise Unsupported("MaxPool with padding, ceil mode or dilation")
            layer = MaxPool(node, consts, params, data)
            layer.kernel, layer.stride = tuple(attrs["kernel_shape"]), tuple(attrs.get("strides", [1, 1]))
        elif op == "Add" and ("bias" in params or "bias" in consts):
            layer = Bias(node, consts, params, data)
        elif op == "BatchNormalization":
            if attrs.get("training_mode", 0):
                raise Unsupported("BatchNormalization in training mode")
            layer = BatchNorm(node, consts, params, data)
            layer.eps = np.float32(attrs.get("epsilon", 1e-5))
        elif op in ("Flatten", "Reshape"):
            if op == "Flatten" and attrs.get("axis", 1) != 1:
                raise Unsupported("Flatten with axis != 1")
            layer = Flatten(node, {}, {}, data)
        elif op in ("ReduceMean", "GlobalAveragePool"):
            axes = attrs.get("axes") if len(node.input) < 2 else const.get(node.input[1])
            if op == "ReduceMean" and (axes is None or sorted(int(a) % 4 for a in np.ravel(axes)) != [2, 3]):
                raise Unsupported("ReduceMean over axes other than the two spatial ones")
            layer = SpatialMean(node, {}, {}, data)
            layer.keepdims = op == "GlobalAveragePool" or bool(attrs.get("keepdims", 1))
        else:
            raise Unsupported(f"op {op}")
        return layer

    # ------------------------------------------------------------ evaluation

    def forward(self, x, a0):
        """Every layer's output at params x and input a0: name -> array."""
        acts = {self.input_name: a0}
        for layer in self.layers:
            acts[layer.output] = layer.forward_from(acts, x)
        return acts

    def losses(self, params, probe, inputs, targets):
        if not isinstance(probe, CoordinateProbe):
            raise Unsupported("direction probes")
        x = np.asarray(params, np.float32)
        a0 = np.ascontiguousarray(inputs[self.input_name], np.float32)
        y = targets[self.target_name]
        if self.subgraphs is not None:
            # only the activations this step's layers read: onnxruntime frees the others as it goes
            names = sorted(set().union({self.output}, *(self.needs(j) for j in np.unique(self.owner[probe.index])))
                           - {self.input_name})
            acts = dict(self.subgraphs.run(names, x, a0), **{self.input_name: a0})
        else:
            acts = self.forward(x, a0)
        out = np.empty(len(probe))
        base_rows = probe.delta == 0
        if base_rows.any():
            out[base_rows] = self.sample_losses(acts[self.output], y).mean()
        rows = np.flatnonzero(~base_rows)
        owners = self.owner[probe.index[rows]]
        # rows per chunk, so that blocks, responses and dense copies of a chunk stay under the cap
        widest = self.sample_bytes * len(a0)
        chunk = int(max(1, self.memory_bytes // (16 * widest)))
        for j in np.unique(owners):
            layer_rows = rows[owners == j]
            for s in range(0, len(layer_rows), chunk):
                sel = layer_rows[s:s + chunk]
                out[sel] = self._layer_losses(j, x, acts, probe.index[sel], probe.delta[sel].astype(np.float32), y)
        return out

    def _layer_losses(self, j, x, acts, index, delta, y):
        layer = self.layers[j]
        if self.paths[j].startswith("generic"):
            return self._generic_losses(layer, x, acts, index, delta, y)
        result = np.empty(len(index))
        for role, entry in layer.params.items():
            mine = (index >= entry["offset"]) & (index < entry["offset"] + entry["size"])
            if not mine.any():
                continue
            element = index[mine] - entry["offset"]
            if isinstance(layer, Direct):
                d = delta[mine]
                result[mine] = self._dense_losses(layer.output, x, acts, lambda rows: layer.perturbed(
                    acts, x, role, element[rows], d[rows]), len(element), y)
                continue
            if isinstance(layer, (Gemm, Conv, Bias)):
                channels, v = layer.block(acts[layer.inputs[0]], acts[layer.output], x, role, element, delta[mine])
            else:
                channels, v = self._channel_param_block(layer, x, acts, role, element, delta[mine])
            result[mine] = self._propagate(layer.output, x, acts, channels, v, y)
        return result

    def _generic_losses(self, layer, x, acts, index, delta, y):
        """The exact generic path (an op without a perturbed-output kernel, or a suffix that mixes samples): for
        each coordinate, onnxruntime runs the graph from the layer's input (base activations: the frozen part is
        not rerun) with that coordinate moved."""
        starts = self.generic_starts(layer)
        session, extra = self.suffix(starts)
        feed = {name: acts[name] for name in list(starts) + extra}
        out, moved = np.empty(len(index)), x.copy()
        for r, (i, d) in enumerate(zip(index, delta)):
            moved[i] = x[i] + d
            feed[self.manifest["params_input"]] = moved
            out[r] = self.sample_losses(session.run(None, feed)[0], y).mean()
            moved[i] = x[i]
        return out

    @staticmethod
    def generic_starts(layer):
        """Where the generic path starts: the activation inputs of every op that reads the layer's tensors."""
        return tuple(getattr(layer, "starts", None) or layer.inputs[:1])

    @staticmethod
    def _channel_param_block(layer, x, acts, role, element, delta):
        """A per-channel layer's parameter perturbed: recompute its output on that channel only."""
        xs = np.repeat(x[None], len(element), axis=0)
        offset = layer.params[role]["offset"]
        xs[np.arange(len(element)), offset + element] += delta
        channels = element
        a = acts[layer.inputs[0]]
        base_in = a[:, channels].transpose(1, 0, 2, 3) if a.ndim == 4 else a[:, channels].T[..., None]
        v = np.stack([layer.on_block(base_in[r:r + 1], channels[r:r + 1], 1, xs[r])[0] for r in range(len(element))])
        return channels, v

    def _propagate(self, t, x, acts, channels, v, y):
        """Carry blocks v [R, N, ...] (channel `channels` of tensor t) on; returns R losses."""
        size = int(np.prod(v.shape[2:]))
        for layer in self._sparse_path(t):
            if layer.linear:
                change = v - self._take_block(acts[t], channels, v.shape)

                def dense(rows):
                    return acts[layer.output][None] + layer.respond(x, channels[rows], size, change[rows])
                return self._dense_losses(layer.output, x, acts, dense, len(channels), y)
            if isinstance(layer, Sum):
                other = layer.inputs[1] if layer.inputs[0] == t else layer.inputs[0]
                v = v + self._take_block(acts[other], channels, v.shape)
            else:
                v = layer.on_block(v, channels, size, x)
            size, t = int(np.prod(v.shape[2:])), layer.output

        def spliced(rows):
            return self._splice(acts[t], channels[rows], v[rows])
        return self._dense_losses(t, x, acts, spliced, len(channels), y)

    @staticmethod
    def _take_block(a, channels, shape):
        if a.ndim == 4:
            return a[:, channels].transpose(1, 0, 2, 3).reshape(shape)
        size = int(np.prod(shape[2:]))
        cols = channels[:, None] * size + np.arange(size)
        return a[:, cols].transpose(1, 0, 2).reshape(shape)

    @staticmethod
    def _splice(a, channels, v):
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

    def _sparse_path(self, t):
        """The layers a one-channel change of tensor t is carried through before the dense part: on while
        the changed tensor has one consumer, up to and including the next linear layer."""
        while self.propagate and t != self.output and len(self.consumers.get(t, ())) == 1:
            layer = self.consumers[t][0]
            if isinstance(layer, Opaque):
                return
            yield layer
            if layer.linear:
                return
            t = layer.output

    def needs(self, j):
        """The base activations that perturbing layer j's parameters reads (see _propagate)."""
        if j not in self._needs and self.paths.get(j, "").startswith("generic"):
            starts = self.generic_starts(self.layers[j])
            self._needs[j] = set(starts) | set(self.suffix(starts)[1])
        if j not in self._needs:
            layer = self.layers[j]
            names, t = set(layer.inputs) | {layer.output}, layer.output
            for layer in ([] if isinstance(layer, Direct) else self._sparse_path(t)):
                names |= set(layer.inputs) | {layer.output}
                t = layer.output
            changed = {t} | {later.output for later, _ in self.downstream(t)}
            for later, _ in self.downstream(t):
                names |= {name for name in later.inputs if name not in changed}
            if self.paths.get(j, "").startswith("stacked"):
                names |= set(self.suffix(t)[1])
            self._needs[j] = names
        return self._needs[j]

    def downstream(self, start):
        """The layers that depend on tensor `start`, in order, each with the tensors last used by it."""
        if start not in self._downstream:
            changed, layers = {start}, []
            for layer in self.layers:
                if any(name in changed for name in layer.inputs):
                    layers.append(layer)
                    changed.add(layer.output)
            last = {}
            for k, layer in enumerate(layers):
                last.update({name: k for name in layer.inputs if name in changed})
            drops = [[name for name, k2 in last.items() if k2 == k and name != self.output]
                     for k in range(len(layers))]
            self._downstream[start] = list(zip(layers, drops))
        return self._downstream[start]

    def _dense_losses(self, start, x, acts, dense, copies, y):
        """Copies dense(rows) [len(rows), N, ...] of tensor `start` through the layers that depend on it,
        chunked under the memory cap; their losses. The other inputs of those layers keep base values.

        Every layer works per sample, so a copy's sample whose `start` row equals the base row (a ReLU
        that stays off, a zero input) keeps its base loss: only the changed (copy, sample) rows run."""
        widest = self.sample_bytes * len(acts[self.input_name])
        chunk = int(max(1, min(copies, self.memory_bytes // (16 * widest + 1))))  # room for live tensors, windows
        base = self.sample_losses(acts[self.output], y)
        out = np.empty(copies)
        for s in range(0, copies, chunk):
            part = dense(np.arange(s, min(s + chunk, copies)))
            r, n = part.shape[:2]
            changed = (part != acts[start][None]).reshape(r, n, -1).any(axis=2)
            if not changed.any():  # no copy changed any sample: all keep the base loss
                out[s:s + chunk] = base.mean()
                continue
            copy, sample = np.nonzero(changed)
            live = {start: part.reshape(r * n, *part.shape[2:]) if changed.all() else part[copy, sample]}
            if any(isinstance(layer, Opaque) for layer, _ in self.downstream(start)):
                live[self.output] = self.run_suffix(start, live[start], acts, sample, x)
            else:
                for layer, drops in self.downstream(start):
                    live[layer.output] = layer.copies(live, acts, sample, x)
                    for name in drops:
                        del live[name]
            change = self.sample_losses(live[self.output], y[sample]) - base[sample]
            out[s:s + chunk] = (base.sum() + np.bincount(copy, weights=change, minlength=r)) / n
        return out
