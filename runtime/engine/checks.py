"""The engine's checks at build time: which per-sample loss a step uses, and which layers' suffixes may run on
stacked copies (functions of a GraphEngine, called once by reader.read_engine)."""
import numpy as np

from ..sessions import make_session
from .graph import cut
from .ops import Mode
from .step import Path, Route

BATCH_MIXING = {"DynamicQuantizeLinear"}  # ops whose output depends on every sample of the batch


def check_loss(engine, subgraphs, scores, rng):
    """Format 2: the per-sample losses come from the loss graph; numpy's formula of a built-in kind is used
    instead only where it gives the graph's values on a probe batch (1e-5 relative)."""
    name = engine.manifest["loss"].get("per_sample")
    if name is None:
        return
    model = engine.loss_model = cut(subgraphs.model, [engine.output, engine.target_name], [name])
    session = make_session(model, subgraphs.device, subgraphs.threads, arena=False)
    engine.loss_session = session
    if engine.kind in ("mse", "cross_entropy", "binary_cross_entropy"):
        y = rng.integers(0, scores.shape[-1], len(scores)) if engine.kind == "cross_entropy" else \
            rng.random(scores.shape).astype(np.float32)
        graph = engine.sample_losses(scores, y)
        engine.loss_session = None
        if not np.allclose(engine.sample_losses(scores, y), graph, rtol=1e-5, atol=1e-6):
            engine.loss_session = session


def check_stacking(engine, a0, budget_check=lambda: None):
    """Each stacked suffix must treat samples independently: a run on two different stacked copies must
    equal separate runs (training-mode BatchNorm, batch reductions and batch sizes baked into a Reshape
    fail this). Layers whose suffix fails take the generic path, and the path says why."""
    x = np.zeros(engine.manifest["num_params"], np.float32)
    for j, route in list(engine.routes.items()):
        if route.path is Path.GENERIC and op_stackable(engine, j) and \
                stacks(engine, engine.ops[j].output, x, a0) is None:
            engine.routes[j] = Route(Path.OP_STACKED, engine.ops[j].node.op_type)
        if route.path is not Path.STACKED:
            continue
        why = stacks(engine, engine.start_of(j), x, a0)
        budget_check()
        if why:
            engine.routes[j] = Route(Path.GENERIC, route.detail + why)


def op_stackable(engine, j):
    """An op onnxruntime runs alone per perturbation (OP_STACKED): one that reads its tensors through
    weight-side nodes only (not shared with other ops) and has one output."""
    op = engine.ops[j]
    used = {n for node in engine.cuts.model.graph.node for n in node.input}
    return (op.mode is Mode.OPAQUE and not getattr(op, "shared", False) and len(op.inputs) >= 1
            and list(op.starts or ()) == list(op.inputs)
            and not any(o in used for o in op.node.output[1:]))


def stacks(engine, start, x, a0):
    """None where the suffix from `start` may run on stacked copies; else why not."""
    mixing = sorted({n.op_type for n in engine.suffix_model(start)[0].graph.node} & BATCH_MIXING)
    if mixing:  # one statistic over the whole (stacked) batch: copies would change each other's values
        return f" (past {mixing[0]}: one scale from the whole batch)"
    extra = engine.suffix(start)[1]
    acts = engine.subgraphs.run(sorted({start, engine.output} | set(extra)), x, a0)
    n = len(a0)
    base = acts[start]
    other = (base // 2 + 1 if base.dtype.kind in "iu" else base * 0.5 + 0.25).astype(base.dtype)  # another
    # copy, in the tensor's own type (int8 between QOperator layers, float16 in fp16 models)
    both = np.concatenate([acts[start], other])
    try:
        stacked = engine.run_suffix(start, both, acts, np.concatenate([np.arange(n), np.arange(n)]), x)[:n]
        alone = engine.run_suffix(start, acts[start], acts, np.arange(n), x)
        ok = stacked.shape == alone.shape and np.allclose(stacked, alone, rtol=1e-4, atol=1e-5)
    except Exception:  # onnxruntime refusing the stacked batch (a batch size baked into a shape)
        ok = False
    return None if ok else " (mixes samples or fixes the batch size)"
