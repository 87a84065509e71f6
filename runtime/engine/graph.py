"""Reading loss.onnx: what each tensor depends on, which nodes reach which tensors, and onnxruntime sessions of
cut subgraphs (values used inside If/Loop bodies are kept)."""
from collections import OrderedDict

import onnx

from ..memory import rss_mb
from ..sessions import make_session


class Unsupported(Exception):
    """The graph or probe is outside what the engine handles; the message says why."""


_RANK = {"static": 0, "batch": 1, "param": 2, "data": 3}


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def subgraph_inputs(node):
    """The names a node reads: its inputs plus the outer-scope names its If/Loop/Scan bodies use."""
    names = [n for n in node.input if n]
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            local = {t.name for t in g.initializer} | {i.name for i in g.input}
            for inner in g.node:
                names += [n for n in subgraph_inputs(inner) if n not in local]
                local.update(inner.output)
    return names


def kinds_of(graph, const, params_name, input_name):
    """The kind of every tensor: 'static' (fixed values), 'batch' (depends on the batch size only),
    'param' (slices of the flat params), 'data' (depends on the input's values)."""
    kinds = {name: "static" for name in const}
    kinds[params_name], kinds[input_name] = "param", "data"
    for node in graph.node:
        if node.op_type == "Shape":
            kind = "batch" if kinds.get(node.input[0]) in ("data", "batch") else "static"
        elif node.op_type == "CastLike":  # only the second input's dtype is read
            kind = kinds.get(node.input[0], "data")
        else:
            kind = max((kinds.get(n, "data") for n in subgraph_inputs(node)), key=_RANK.get, default="static")
        for name in node.output:
            kinds[name] = kind
    return kinds


def downstream(nodes, names):
    """(the nodes, in graph order, that read any of `names` directly or through earlier such nodes; every tensor
    they reach, `names` included). Forward reachability; `reachable` is the backward one."""
    reached, after = set(names), []
    for node in nodes:
        if any(n in reached for n in subgraph_inputs(node)):
            after.append(node)
            reached.update(node.output)
    return after, reached


def frozen_frontier(nodes, params_name, input_name):
    """The activations that the nodes the params reach read from the frozen part (the part computed from the input
    alone): where the rows of a direction probe stop sharing work."""
    reached_nodes, reached = downstream(nodes, [params_name])
    data = downstream(nodes, [input_name])[1]
    return tuple(sorted({n for node in reached_nodes for n in subgraph_inputs(node) if n in data and n not in reached}))


def ancestors(nodes, kinds, output):
    """The data nodes the model output depends on, in graph (topological) order."""
    needed, kept = {output}, []
    for node in reversed(nodes):
        if node.output[0] in needed:
            kept.append(node)
            needed.update(n for n in subgraph_inputs(node) if kinds.get(n) == "data")
    return kept[::-1]


def reachable(graph, outputs, inputs=()):
    """(the nodes `outputs` need, in graph order; every name they read), stopping at `inputs`."""
    producer = {o: node for node in graph.node for o in node.output}
    seen, keep, stack = set(inputs), set(), list(outputs)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(subgraph_inputs(node))
    return [n for n in graph.node if id(n) in keep], seen


def cut(model, inputs, outputs):
    """The part of `model` from `inputs` to `outputs` (values used inside If/Loop bodies are kept)."""
    graph = model.graph
    nodes, seen = reachable(graph, outputs, inputs)
    types = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    missing = [n for n in outputs if n not in types]
    if missing:
        raise Unsupported(f"cannot cut the graph: no type for {missing[0]!r}")
    sub = onnx.helper.make_graph(nodes, "cut", [types[n] for n in inputs],
                                 [types[n] for n in outputs], [t for t in graph.initializer if t.name in seen])
    return onnx.helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)


# com.microsoft quantized ops (onnxruntime's QOperator form), which ONNX shape inference does not type: the
# position of the output zero point, whose element type is the output's
_ZERO_POINT_OUT = {"QGemm": 8, "QLinearAdd": 7, "QLinearMul": 7, "QLinearGlobalAveragePool": 4,
                   "QLinearAveragePool": 4, "QLinearSigmoid": 4, "QLinearLeakyRelu": 4, "QLinearSoftmax": 4,
                   "QLinearConcat": 2}


def add_contrib_types(model):
    """value_info for the outputs of the contrib quantized ops above (their element type only)."""
    graph = model.graph
    known = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input)
             + list(graph.output)}
    known.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        k = _ZERO_POINT_OUT.get(node.op_type)
        if k is None or node.output[0] in known:
            continue
        zero_point = node.input[k] if len(node.input) > k and node.input[k] else None
        kind = known.get(zero_point, onnx.TensorProto.UINT8)  # no zero point: uint8, as the ops define
        graph.value_info.append(onnx.helper.make_tensor_value_info(node.output[0], kind, None))
        known[node.output[0]] = kind
    return model


def typed(model):
    """`model` with an element type for every tensor a cut may end at. loss.onnx as exported carries them
    (exporters.onnx_graph.write_artifact); other files get ONNX shape inference here, whose op schemas cost
    the device 5.5 MiB of RSS."""
    graph = model.graph
    known = {v.name for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    if all(o in known for node in graph.node for o in node.output if o):
        return model
    return add_contrib_types(onnx.shape_inference.infer_shapes(model))


def element_types(model):
    """A copy of `model` whose value_info gives every tensor ONNX can type its element type (no shape: nothing
    for onnxruntime to disagree with)."""
    out, inferred = onnx.ModelProto(), typed(model)
    out.CopyFrom(model)
    del out.graph.value_info[:]
    for v in inferred.graph.value_info:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            out.graph.value_info.append(onnx.helper.make_tensor_value_info(v.name, v.type.tensor_type.elem_type, None))
    return out


SESSION_MB = 4  # an onnxruntime session's own memory besides its weights (54 int8 cuts held 334 MiB)


def cut_session(model, device, threads, arena=False):
    """(a session of a cut, arena-less unless asked, its estimated size in MiB: its weights twice (onnxruntime's
    copy and a prepacked one) and SESSION_MB; the RSS growth while it is made misses what its first run allocates)."""
    return make_session(model, device, threads, arena=arena), SESSION_MB + 2 * model.ByteSize() / 2 ** 20


class Recent:
    """Values (sessions) made on first use; the least recently used are dropped while there are more than `keep`
    and their sizes add up to more than `mb` (None: no size cap). make() returns (value, estimated MiB); the
    size kept is the larger of that and the RSS growth measured while it was made.
    CoCD and BCCD walk the coordinates in order, so a step uses one or two layers' cut sessions and a dropped one
    is made again at most once per cycle; keeping every layer's suffix session held the int8 MobileNetV3's
    --scales engine 420 MiB above the naive path."""

    def __init__(self, keep, mb=None):
        self.keep, self.mb, self.items, self.sizes = keep, mb, OrderedDict(), {}

    def get(self, key, make):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        before = rss_mb() or 0.0
        self.items[key], estimate = make()
        self.sizes[key] = max((rss_mb() or 0.0) - before, estimate)
        self.limit(self.mb)
        return self.items[key]

    def limit(self, mb):
        """Cap the kept sizes at `mb` MiB from now on, dropping the least recently used over it."""
        self.mb = mb
        while len(self.items) > self.keep and (self.mb is None or sum(self.sizes.values()) > self.mb):
            old = next(iter(self.items))
            del self.items[old], self.sizes[old]

    def __len__(self):
        return len(self.items)

    def clear(self):
        self.items.clear()
        self.sizes.clear()


class Subgraphs:
    """Sessions for parts of loss.onnx from the flat params and the model input to given tensors, made
    on first use and cached (the few most recent). A session computes only what its outputs need."""

    def __init__(self, model, manifest, threads, keep=8, device="cpu"):
        self.model = typed(model)
        self.inputs = [manifest["params_input"], manifest["inputs"][0]["name"]]
        self.threads, self.sessions, self.device = threads, Recent(keep), device

    arena = False  # read_engine sets it for the steps (see there)

    def session(self, names):
        return self.sessions.get(tuple(names), lambda: cut_session(cut(self.model, self.inputs, list(names)),
                                                                    self.device, self.threads, arena=self.arena))

    def latest(self, name):
        """The output names of the most recently used session that computes `name`, or None."""
        return next((names for names in reversed(self.sessions.items) if name in names), None)

    def run(self, names, params, a0):
        return dict(zip(names, self.session(names).run(list(names), {self.inputs[0]: params, self.inputs[1]: a0})))
