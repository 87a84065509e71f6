"""The CPU evaluation engine: all losses of a coordinate probe for a fraction of 2B forward passes.

loss.onnx is read once (reader.py) into the ops of the registry (ops.py). Tensors computed from shapes only (the
zero conv biases and batch-size Reshapes of the torch exporter) are folded at build time. Per step:

1. prefix reuse: one base forward caches every op's output (one onnxruntime call for graphs with
   convolutions, numpy for Gemm-only graphs, where that is faster);
2. a perturbed weight or bias changes one output unit or channel of its op (a "block"): it is
   computed directly (eps times one input column, or one shifted input map);
3. delta propagation: while the changed tensor has one consumer, ops that support it (Relu, LeakyRelu,
   MaxPool, BatchNorm, bias, Flatten, spatial mean, a residual Add with the other input at its base value)
   keep the change in that block; the next Gemm/Conv is linear, so its output is the cached base
   output plus a one-column (one-input-channel) product of the change;
4. only the ops that depend on the changed tensor run densely on the copies (a skip branch that
   does not keeps its base value), chunked under a memory cap.
If the block reaches the model output, the loss follows in O(batch x outputs) per copy.

`propagate=False` skips step 3 (the "batched" level: the perturbed op's full output goes through
the rest of the network). The frozen part (what no trainable tensor reaches) runs in the base onnxruntime
call whatever its ops. Per trainable tensor (step.Path): where ops without numpy code lie downstream,
onnxruntime runs that part on the copies stacked on the batch axis (STACKED); ops read in DIRECT mode get their
perturbed output from their `move` and the rest stacked; where no kernel applies (or a tensor is read by several
ops, or the stacked part mixes samples) onnxruntime runs from the ops' inputs per perturbation (GENERIC). The
per-sample loss is the graph's own (format 2); a scalar custom loss raises Unsupported and the caller uses the
naive path. device.py runs the same paths on an accelerator.
"""
import numpy as np

from ..loss import per_sample_losses, scores_name
from ..probes import coordinate_moves, perturbed
from .fanout import Fanout, cpu_workers
from .graph import Recent, Unsupported, cut, cut_session, downstream, frozen_frontier, subgraph_inputs
from .op_copies import op_copies
from .ops import Mode, splice, take_block
from .step import Path, Route, StepEngine


SESSIONS_KEPT = 2  # cut sessions always kept, whatever their size (more than one step uses)


class GraphEngine(StepEngine):
    """Exact fast losses for coordinate probes on a loss graph of the registry's ops (chains and residual DAGs)."""

    def __init__(self, ops, manifest, propagate=True, memory_mb=256, subgraphs=None, sample_bytes=0, kinds=None,
                 cuts=None):
        self.ops, self.manifest, self.subgraphs = ops, manifest, subgraphs
        self.kinds, self.cuts = kinds, cuts  # cuts: the cut-subgraph factory, even where the base forward is numpy
        self.sample_bytes = sample_bytes  # the widest activation of one sample, in bytes
        self.propagate, self.memory_bytes = propagate, memory_mb * 2 ** 20
        self.kind, self.loss_session = manifest["loss"]["kind"], None
        self.input_name = manifest["inputs"][0]["name"]
        self.input_dtype = np.dtype(manifest["inputs"][0].get("dtype", "float32"))
        self.target_name = manifest["targets"][0]["name"]
        self.output = scores_name(manifest)
        self.owner = np.empty(manifest["num_params"], np.int64)  # flat index -> op index
        for j, op in enumerate(ops):
            for entry in op.params.values():
                self.owner[entry["offset"]:entry["offset"] + entry["size"]] = j
        self.consumers = {}
        for op in ops:
            for name in op.inputs:
                self.consumers.setdefault(name, []).append(op)
        self._downstream, self._needs, self._frontier = {}, {}, None
        on_cpu = cuts is not None and cuts.device == "cpu"
        self.fan = Fanout(cpu_workers(cuts.threads) if on_cpu else 1)  # per-probe calls side by side (fanout.py)
        # cut sessions kept under the memory cap (as the stacked copies are): a step uses one or two layers'
        self._suffixes, self._op_sessions = Recent(SESSIONS_KEPT), Recent(SESSIONS_KEPT)
        self.limit_memory(memory_mb)
        self.routes = {j: self._route(op) for j, op in enumerate(ops) if op.params}

    def limit_memory(self, mb):
        """One budget for what steps add: half for a chunk of copies, 3/8 for suffix sessions, 1/8 for op sessions.
        The chunk's half is rounded down to a power of two MiB: the chunk sets how copies stack, which moves losses by
        an ulp, and mb is what a measured build left, so it must not follow RSS noise."""
        self.memory_bytes = 2.0 ** np.floor(np.log2(max(mb, 2 ** -10) / 2)) * 2 ** 20
        self._suffixes.limit(mb * 3 / 8)
        self._op_sessions.limit(mb / 8)

    def _route(self, op):
        if op.mode is Mode.OPAQUE:
            return Route(Path.GENERIC, f"{op.node.op_type} ({op.reason})")
        blocked = sorted({later.node.op_type for later, _ in self.downstream(op.output) if later.mode is not Mode.NUMPY})
        return Route(Path.STACKED, ", ".join(blocked)) if blocked else Route(Path.ENGINE)

    def sample_losses(self, scores, y):
        """Per-sample losses [P] (float64) of scores [P, ...] and targets y [P, ...]: the loss graph's own
        per-sample output (format 2) by a session from the scores, or for a built-in kind numpy's formula where
        build() found it equal to the graph's (format 1 artifacts: numpy's formula)."""
        if self.loss_session is None:
            y = y.astype(np.int64) if self.kind == "cross_entropy" else y.astype(np.float64)
            return per_sample_losses(scores, y, self.kind)
        feed = {self.output: np.ascontiguousarray(scores), self.target_name: y}
        return self.loss_session.run(None, feed)[0].astype(np.float64)

    def dense_start(self, t):
        """Where the dense part begins for a change of tensor t (see _propagate)."""
        for op in self._sparse_path(t):
            t = op.output
        return t

    def start_of(self, j):
        """Where the dense part begins for perturbations of op j's parameters."""
        op = self.ops[j]
        return op.output if op.mode is Mode.DIRECT else self.dense_start(op.output)

    def suffix_model(self, start):
        """(the cut of loss.onnx from `start` (a name, or a tuple of names) to the loss's scores, names of the
        other activations it reads). Values computed from the batch size (Shape) are recomputed from the
        activations they read, so that a stacked batch gets its own size."""
        starts = (start,) if isinstance(start, str) else tuple(start)
        graph = self.cuts.model.graph
        nodes, after = downstream(graph.node, starts)
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

        def make():
            model, extra = self.suffix_model(starts)
            session, mb = self.probe_session(model)
            return (session, extra), mb
        return self._suffixes.get(starts, make)

    def probe_session(self, model):
        """(a session of a cut for per-probe calls, its estimated MiB): single-threaded where the fanout runs
        several calls side by side, allocating from the shared arena on the CPU."""
        threads = 1 if self.fan.workers > 1 else self.cuts.threads
        return cut_session(model, self.cuts.device, threads, arena="shared")

    def run_suffix(self, start, rows, acts, sample, x):
        """Scores of the changed (copy, sample) rows [k, ...] of `start`, stacked on the batch axis; the other
        activations the suffix reads are the base ones of the same samples. The rows are split between the
        fanout's calls."""
        session, extra = self.suffix(start)

        def run(part):
            feed = {self.manifest["params_input"]: x, start: np.ascontiguousarray(rows[part])}
            for name in extra:
                feed[name] = acts[name][sample[part]]
            return session.run(None, feed)[0]
        return self.fan.split(len(rows), run, len(rows) * self.sample_bytes)

    @classmethod
    def build(cls, model_path, manifest, propagate=True, memory_mb=256, threads=None, device="cpu"):
        """The engine for loss.onnx at model_path (reader.py); raises Unsupported where it does not apply."""
        from .reader import read_engine
        return read_engine(cls, model_path, manifest, propagate, memory_mb, threads, device)

    # ------------------------------------------------------------ evaluation

    def forward(self, x, a0):
        """Every op's output at params x and input a0: name -> array."""
        acts = {self.input_name: a0}
        for op in self.ops:
            acts[op.output] = op.forward_from(acts, x)
        return acts

    def base(self, x, a0, owners):
        if self.subgraphs is None:
            return self.forward(x, a0)
        return dict(self.subgraphs.run(self.base_names(owners), x, a0), **{self.input_name: a0})

    def base_names(self, owners):
        """The activations a step of these ops reads: onnxruntime frees the others as it goes."""
        return sorted(set().union({self.output}, *(self.needs(j) for j in owners)) - {self.input_name})

    def first_base_names(self):
        """The activations the first trainable op's steps read (the base session a run starts with)."""
        return self.base_names([int(self.owner[0])])

    def scores(self, acts):
        return acts[self.output]

    def evaluate(self, x, a0, y):
        """(mean loss, scores) at params x by the steps' base session (the latest, or the first step's), so that
        an evaluation adds no session and no arena of its own."""
        names = self.subgraphs.latest(self.output) or self.first_base_names()
        scores = self.subgraphs.run(names, x, a0)[self.output]
        return float(self.sample_losses(scores, y).mean()), scores

    def owner_losses(self, j, x, acts, a0, index, delta, y):
        op = self.ops[j]
        if self.routes[j].path is Path.GENERIC:
            return self._generic_losses(op, x, acts, index, delta, y)
        if self.routes[j].path is Path.OP_STACKED:
            return self._dense_losses(op.output, x, acts, op_copies(self, op, x, acts, index, delta), len(index), y)
        result = np.empty(len(index))
        for role, entry, mine in self.roles_of(op, index):
            element = index[mine] - entry["offset"]
            if op.mode is Mode.DIRECT:
                d = delta[mine]
                result[mine] = self._dense_losses(op.output, x, acts, lambda rows: op.perturbed(
                    acts, x, role, element[rows], d[rows]), len(element), y)
                continue
            channels, v = op.block(acts[op.inputs[0]], acts[op.output], x, role, element, delta[mine])
            result[mine] = self._propagate(op.output, x, acts, channels, v, y)
        return result

    def _generic_losses(self, op, x, acts, index, delta, y):
        """The exact generic path (an op without a perturbed-output kernel, or a suffix that mixes samples): for
        each coordinate, onnxruntime runs the graph from the layer's input (base activations: the frozen part is
        not rerun) with that coordinate moved."""
        starts = self.generic_starts(op)
        session, extra = self.suffix(starts)
        base = {name: acts[name] for name in list(starts) + extra}

        def run(part):
            feed, out = dict(base), []
            for moved in coordinate_moves(x, index[part], delta[part]):
                feed[self.manifest["params_input"]] = moved
                out.append(self.sample_losses(session.run(None, feed)[0], y).mean())
            return np.array(out, np.float64)
        return self.fan.split(len(index), run, len(index) * len(y) * self.sample_bytes)

    def direction_losses(self, params, probe, a0, y):
        """A direction probe (SPSA, MeZO, ZO-SGD: every weight moves in every row): the frozen part of the graph
        once, the part the params reach once per row from its frontier (exact: the same ops on the same values)."""
        if self._frontier is None:  # read off the graph once
            self._frontier = frozen_frontier(self.cuts.model.graph.node, self.manifest["params_input"],
                                             self.input_name)
        starts = self._frontier
        if starts in ((), (self.input_name,)):
            raise Unsupported("direction probes: the first op reads the params (no frozen part to share)")
        session, extra = self.suffix(starts)
        x = np.ascontiguousarray(params, np.float32)
        needed = set(starts) | set(extra)
        # the scores too: for a head the steps' base session (made by the build) is this one, and evaluations use it
        feed = self.cuts.run(sorted(needed | {self.output}), x, np.ascontiguousarray(a0, self.input_dtype))
        base = {name: feed[name] for name in needed}

        def run(part):
            out = []
            for row in range(len(probe))[part]:
                feed = dict(base, **{self.manifest["params_input"]: perturbed(x, probe, row)})
                out.append(self.sample_losses(session.run(None, feed)[0], y).mean())
            return np.array(out, np.float64)
        return self.fan.split(len(probe), run, len(probe) * len(y) * self.sample_bytes)

    @staticmethod
    def generic_starts(op):
        """Where the generic path starts: the activation inputs of every op that reads the op's tensors."""
        return tuple(op.starts or op.inputs[:1])

    def _propagate(self, t, x, acts, channels, v, y):
        """Carry blocks v [R, N, ...] (channel `channels` of tensor t) on; returns R losses."""
        size = int(np.prod(v.shape[2:]))
        for op in self._sparse_path(t):
            if op.linear:
                change = v - take_block(acts[t], channels, v.shape)

                def dense(rows):
                    return acts[op.output][None] + op.respond(x, channels[rows], size, change[rows])
                return self._dense_losses(op.output, x, acts, dense, len(channels), y)
            v = op.carry(v, t, channels, size, x, acts)
            size, t = int(np.prod(v.shape[2:])), op.output

        def spliced(rows):
            return splice(acts[t], channels[rows], v[rows])
        return self._dense_losses(t, x, acts, spliced, len(channels), y)

    def _sparse_path(self, t):
        """The ops a one-channel change of tensor t is carried through before the dense part: on while
        the changed tensor has one consumer that propagates it, up to and including the next linear op."""
        while self.propagate and t != self.output and len(self.consumers.get(t, ())) == 1:
            op = self.consumers[t][0]
            if op.mode is not Mode.NUMPY:
                return
            yield op
            if op.linear:
                return
            t = op.output

    def needs(self, j):
        """The base activations that perturbing op j's parameters reads (see _propagate)."""
        if j not in self._needs and self.routes[j].path is Path.GENERIC:
            starts = self.generic_starts(self.ops[j])
            self._needs[j] = set(starts) | set(self.suffix(starts)[1])
        if j not in self._needs and self.routes[j].path is Path.OP_STACKED:
            op = self.ops[j]
            self._needs[j] = set(op.inputs) | {op.output} | set(self.suffix(op.output)[1])
        if j not in self._needs:
            op = self.ops[j]
            names, t = set(op.inputs) | {op.output}, op.output
            for later in ([] if op.mode is Mode.DIRECT else self._sparse_path(t)):
                names |= set(later.inputs) | {later.output}
                t = later.output
            changed = {t} | {later.output for later, _ in self.downstream(t)}
            for later, _ in self.downstream(t):
                names |= {name for name in later.inputs if name not in changed}
            if self.routes[j].path is Path.STACKED:
                names |= set(self.suffix(t)[1])
            self._needs[j] = names
        return self._needs[j]

    def downstream(self, start):
        """The ops that depend on tensor `start`, in order, each with the tensors last used by it."""
        if start not in self._downstream:
            nodes, changed = downstream([op.node for op in self.ops], {start})
            after = {id(node) for node in nodes}
            ops = [op for op in self.ops if id(op.node) in after]
            last = {}
            for k, op in enumerate(ops):
                last.update({name: k for name in op.inputs if name in changed})
            drops = [[name for name, k2 in last.items() if k2 == k and name != self.output]
                     for k in range(len(ops))]
            self._downstream[start] = list(zip(ops, drops))
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
            if any(op.mode is not Mode.NUMPY for op, _ in self.downstream(start)):
                live[self.output] = self.run_suffix(start, live[start], acts, sample, x)
            else:
                for op, drops in self.downstream(start):
                    live[op.output] = op.copies(live, acts, sample, x)
                    for name in drops:
                        del live[name]
            change = self.sample_losses(live[self.output], y[sample]) - base[sample]
            out[s:s + chunk] = (base.sum() + np.bincount(copy, weights=change, minlength=r)) / n
        return out
