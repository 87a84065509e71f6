"""The evaluation engine: all losses of a coordinate probe for a fraction of 2B forward passes.

loss.onnx is read once (reader.py) into a graph of numpy layers (Gemm, MatMul, bias Add, Conv, Relu, LeakyRelu,
MaxPool, BatchNormalization in inference form, Flatten/Reshape, spatial ReduceMean/GlobalAveragePool, and the Add
of two activations that joins a residual branch). Tensors computed from shapes only (the zero conv biases and
batch-size Reshapes of the torch exporter) are folded at build time. Per step:

1. prefix reuse: one base forward caches every layer's output (one onnxruntime call for graphs with
   convolutions, numpy for Gemm-only graphs, where that is faster);
2. a perturbed weight or bias changes one output unit or channel of its layer (a "block"): it is
   computed directly (eps times one input column, or one shifted input map);
3. delta propagation: while the changed tensor has one consumer, per-channel ops (Relu, LeakyRelu,
   MaxPool, BatchNorm, bias, Flatten, spatial mean, a residual Add with the other input at its base value)
   keep the change in that block; the next Gemm/Conv is linear, so its output is the cached base
   output plus a one-column (one-input-channel) product of the change;
4. only the layers that depend on the changed tensor run densely on the copies (a skip branch that
   does not keeps its base value), chunked under a memory cap.
If the block reaches the model output, the loss follows in O(batch x outputs) per copy.

`propagate=False` skips step 3 (the "batched" level: the perturbed layer's full output goes through
the rest of the network). The frozen part (what no trainable tensor reaches) runs in the base onnxruntime
call whatever its ops. Per trainable tensor: where ops without numpy code (layers.Opaque) lie downstream,
onnxruntime runs that part on the copies stacked on the batch axis ("stacked"); ops of other ranks and kinds
get their perturbed output from a kernel (direct.py) and the rest stacked; where no kernel applies (or a
tensor is read by several ops, or the stacked part mixes samples) onnxruntime runs from the ops' inputs per
perturbation ("generic"). The per-sample loss is the graph's own (format 2); a scalar custom loss raises
Unsupported and the caller uses the naive path. device_engine.py runs the same paths on an accelerator.
"""
import numpy as np

from .direct import Direct
from .graph import cut, subgraph_inputs
from .layers import Bias, Conv, Gemm, Opaque, Sum, Unsupported, per_sample_losses, scores_name
from .optim import CoordinateProbe
from .sessions import make_session


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
        """The engine for loss.onnx at model_path (reader.py); raises Unsupported where it does not apply."""
        from .reader import read_engine
        return read_engine(cls, model_path, manifest, propagate, memory_mb, threads, device)

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
