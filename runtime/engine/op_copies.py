"""The op-stacked path's copies (step.Path.OP_STACKED): the output of an op whose weights the params compute through
weight-side nodes (an int8 weight at trained scales, a fake-quantized bias or master weight, a LoRA merge), once per
perturbation, on the step's base activations. The rest of the graph then runs on the copies stacked (core.py)."""
import numpy as np

from ..probes import coordinate_moves
from .graph import cut


def op_copies(engine, op, x, acts, index, delta, columns=True):
    """dense(rows): onnxruntime runs the op alone (with the weight-side nodes that compute its inputs from the
    params) per perturbation; a MatMul by a 2-D weight recomputes the changed columns only (columns=False: the
    whole op, the reference the column copies are tested against)."""
    dense = matmul_copies(engine, op, x, acts, index, delta) if columns and weight_side_matmul(engine, op) else None
    if dense is not None:
        return dense
    params = engine.manifest["params_input"]
    session = engine._op_sessions.get(op.output, lambda: engine.probe_session(
        cut(engine.cuts.model, [params, *op.inputs], [op.output])))
    base = {name: acts[name] for name in op.inputs}
    base_bytes = acts[op.output].nbytes + sum(v.nbytes for v in base.values())

    def dense(rows):
        def run(part):
            feed, out = dict(base), []
            for moved in coordinate_moves(x, index[rows][part], delta[rows][part]):
                feed[params] = moved
                out.append(session.run(None, feed)[0])
            return np.stack(out)
        return engine.fan.split(len(rows), run, len(rows) * base_bytes)
    return dense


def weight_side_matmul(engine, op):
    """A MatMul of one activation by a weight that the params compute (a quantized weight: int8 values dequantized
    at trained scales)."""
    node = op.node
    return (node.op_type == "MatMul" and len(node.input) == 2 and list(op.inputs) == [node.input[0]]
            and engine.kinds.get(node.input[1]) == "param")


def matmul_copies(engine, op, x, acts, index, delta):
    """dense(rows) for a weight_side_matmul: onnxruntime computes the weight from the moved params (as the loss graph
    does); the copy is the base output with the weight's changed columns recomputed (activation @ those columns),
    not a whole MatMul per perturbation (the int8 transformer's --scales: 0.35 ms a copy -> 0.05). In the calling
    thread: handing these small calls to the fanout made them slower (5.3 -> 8.1 ms a step). None where the weight is
    not 2-D (a batched MatMul)."""
    a, w_name = op.node.input
    params = engine.manifest["params_input"]
    session = engine._op_sessions.get((op.output, w_name), lambda: engine.probe_session(
        cut(engine.cuts.model, [params], [w_name])))
    w0 = session.run(None, {params: x})[0]
    if w0.ndim != 2:
        return None
    activation, base = acts[a], acts[op.output]

    def dense(rows):
        out = np.repeat(base[None], len(rows), axis=0)
        for r, moved in enumerate(coordinate_moves(x, index[rows], delta[rows])):
            w = session.run(None, {params: moved})[0]
            changed = np.flatnonzero((w != w0).any(axis=0))
            out[r][..., changed] = activation @ w[:, changed]
        return out
    return dense
