"""Reading loss.onnx into the engine's ops: which part is frozen, which op owns which trainable tensor, and the
mode each node's op class (ops.OPS) reads it in."""
import numpy as np
import onnx
from onnx import numpy_helper

from ..loss import scores_name
from ..memory import rss_mb, trim_heap
from .checks import check_loss, check_stacking
from .graph import Subgraphs, Unsupported, ancestors, attrs, downstream, kinds_of, subgraph_inputs
from .ops import OPS, Context, Mode, Op


def _first_inputs(ops, graph, kinds):
    """The activation inputs of `ops` (in graph order) that do not depend on an earlier one of them."""
    starts, reached = [], set()
    order = {id(node): k for k, node in enumerate(graph.node)}
    for op in sorted({id(o): o for o in ops}.values(), key=lambda o: order[id(o)]):
        for name in op.input:
            if kinds.get(name) == "data" and name not in reached:
                starts.append(name)
                reached = downstream(graph.node, reached | {name})[1]
    return starts


def _constants(graph):
    const = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            a = attrs(node)
            const[node.output[0]] = numpy_helper.to_array(a["value"]) if "value" in a else np.array(a.get("value_ints"))
    return const


def _opaque(node, ctx, owned, starts, reason):
    """An op that onnxruntime runs from `starts` per perturbation of the tensors it owns (the generic path)."""
    op = Op(node, list(dict.fromkeys(ctx.data(subgraph_inputs(node)))))
    op.params = {f"t{i}": ctx.entries[name] for i, name in enumerate(owned)}
    op.starts, op.reason = starts, reason
    return op


def read_ops(graph, nodes, ctx, readers):
    """The op of every node downstream of a trainable tensor, each in the best mode its class allows."""
    ops = []
    for node in nodes:
        reads = sorted({t for n in node.input for t in ctx.param_deps.get(n, ())})
        shared = [t for t in reads if len(readers[t]) > 1]
        if shared:  # the generic path from the inputs of every op that reads them
            owned = [t for t in reads if t not in ctx.used]
            op = _opaque(node, ctx, owned, _first_inputs([r for t in owned for r in readers[t]], graph, ctx.kinds),
                         f"{shared[0]!r} is read by {len(readers[shared[0]])} ops")
            op.shared = True  # its perturbations change other ops' outputs too: never run alone
        else:
            op = OPS.get(node.op_type, Op).read(node, ctx)
            if op.mode is Mode.OPAQUE:
                op = _opaque(node, ctx, reads, op.inputs, op.reason or f"op {node.op_type}")
        ctx.used.update(e["name"] for e in op.params.values())
        ops.append(op)
    return ops


class BuildBudget:
    """The build's RSS growth may not pass --engine-memory-mb (each suffix checked is an onnxruntime session of
    10-15 MiB): checked after each session, so it overshoots by one at most."""

    def __init__(self, memory_mb):
        self.memory_mb, self.start = memory_mb, rss_mb() or 0.0

    def grown(self):
        trim_heap()  # what the build dropped is not held (memory.Trimmer)
        return (rss_mb() or 0.0) - self.start

    def check(self):
        grown = self.grown()
        if grown > self.memory_mb:
            raise Unsupported(f"building it took over {grown:.0f} MiB, --engine-memory-mb is {self.memory_mb:g}")


def read_engine(cls, model_path, manifest, propagate=True, memory_mb=256, threads=None, device="cpu"):
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
    const = _constants(graph)
    kinds = kinds_of(graph, const, manifest["params_input"], manifest["inputs"][0]["name"])
    output = scores_name(manifest)
    nodes = ancestors([n for n in graph.node if kinds[n.output[0]] == "data"], kinds, output)
    # the frozen part (data nodes that no trainable tensor reaches) runs once per step in onnxruntime,
    # any op; only the nodes downstream of a trainable tensor become the engine's ops
    tainted = downstream(graph.node, {manifest["params_input"]})[1]
    frozen = [node for node in nodes if node.output[0] not in tainted]
    nodes = [node for node in nodes if node.output[0] in tainted]
    folded = sorted({n for node in nodes for n in node.input[1:]
                     if n and kinds.get(n) == "static" and n not in const and n not in entries})
    # one run at a dummy batch of 2 (zeros): the folded tensors' values and every activation's shape
    budget = BuildBudget(memory_mb)
    subgraphs = Subgraphs(model, manifest, threads, device=device, keep=2)
    outs = [node.output[0] for node in nodes]
    frozen_in = sorted({n for node in nodes for n in node.input if kinds.get(n) == "data"} - set(outs)
                       - {manifest["inputs"][0]["name"]})
    dtype = np.dtype(manifest["inputs"][0].get("dtype", "float32"))  # float16 inputs (fp16 models), int ids
    probe = subgraphs.run(folded + outs + frozen_in, np.zeros(manifest["num_params"], np.float32),
                          np.zeros([2] + list(manifest["inputs"][0]["shape"][1:]), dtype))
    const.update({n: probe[n] for n in folded})
    param_deps = {name: {name} for name in entries}  # tensor -> the trainable tensors it is computed from
    for node in graph.node:
        deps = set().union(*(param_deps.get(n, ()) for n in node.input))
        if deps and kinds.get(node.output[0]) == "param":
            param_deps.update({out: deps for out in node.output})
    shapes = {name: value.shape for name, value in probe.items()}
    shapes[manifest["inputs"][0]["name"]] = (2, *manifest["inputs"][0]["shape"][1:])
    ctx = Context(const, entries, kinds, shapes, {o: node for node in graph.node for o in node.output},
                  param_deps=param_deps)
    readers = {}  # trainable tensor -> the ops that read it (directly or through Identity, Transpose, ...)
    for node in nodes:
        for name in {t for n in node.input for t in param_deps.get(n, ())}:
            readers.setdefault(name, []).append(node)
    ops = read_ops(graph, nodes, ctx, readers)
    if set(entries) - ctx.used:
        raise Unsupported(f"trainable tensors outside the graph's data path: {sorted(set(entries) - ctx.used)[:3]}")
    for op in ops:
        op.prepare(threads, device)
    # for graphs of numpy ops only (Gemm-only MLPs) numpy's forward is faster than a session call (measured:
    # SARCOS MLP 3.4 vs 4.3 ms per step)
    base = subgraphs if frozen or any(op.mode is not Mode.NUMPY or op.prefers_onnxruntime for op in ops) else None
    widest = max(probe[op.output].nbytes // 2 for op in ops)
    engine = cls(ops, manifest, propagate, memory_mb, base, widest, kinds, subgraphs)
    rng = np.random.default_rng(0)
    a0 = rng.standard_normal([3] + list(manifest["inputs"][0]["shape"][1:])).astype(dtype)
    budget.check()
    engine.limit_memory(0)  # the build checks each layer's suffix once: no session kept beyond the last two
    check_stacking(engine, a0, budget.check)
    scores = probe[output]
    check_loss(engine, subgraphs, (scores + rng.standard_normal(scores.shape)).astype(scores.dtype), rng)
    subgraphs.sessions.clear()  # the build's sessions (each holds the frozen weights) are not the steps'
    # an arena in the base session pays where one base session serves every step (a head: it reuses its blocks
    # where glibc's heap fragmented, demo training's rise 61 -> 43 MiB); where the steps walk many layers, each
    # with its own base session, an arena each held more (transformer last block: 175 vs 158 MiB): they share the
    # per-probe sessions' one arena (arena-less, each call page-faulted its activations in again: 1.3 ms of a 6 ms
    # base forward on the int8 transformer)
    subgraphs.arena = True if len(engine.routes) <= 2 else "shared"
    if base is not None:  # the first step's base session, made while no data is loaded (run.prepare)
        subgraphs.session(engine.first_base_names())
    engine.limit_memory(max(memory_mb - budget.grown(), 1.0))  # what the build holds: the rest is for steps
    return engine
