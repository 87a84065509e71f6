"""int8 models in QDQ form (onnxruntime's quantize_static): what is quantized, and how the loss graph trains it.

A quantized weight is an int8/uint8 initializer read by a DequantizeLinear (its scale and zero point are
initializers, per tensor or per channel); a quantized bias is an int32 initializer whose DequantizeLinear
scale is input scale x weight scale. Three things train, each as float32 values in the one params vector:
- a weight scale (--scales) as a log-factor t, init 0: scale = scale0 * exp(t) (scales span decades: one eps
  fits them all, and a scale stays > 0);
- a bias (--biases) as its float value b, fake-quantized in the graph at the current bias scale
  (bias_scale0 * exp(t) of its weight's scale): round(b / s) * s, as the deployed int32 bias will be;
- a weight (--last-layers, --trainable) as a float master w, quantized in the graph by QuantizeLinear at the
  current scale, so training sees what deploys.
A bias whose weight scale trains is re-quantized with it even where the bias itself is frozen: onnxruntime's QDQ
fusion (QLinearConv, QGemm) reads an int32 bias at input scale x weight scale, so a weight scale must not
silently rescale its bias. `prepare_quantized` rewrites the graph so that flatten_trainable sees float
initializers only; the manifest's "quantized" section tells write-back how to store the values again.
"""
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..runtime.errors import check
from . import onnx_prepare as prep

WEIGHT_TYPES = (TensorProto.INT8, TensorProto.UINT8)
BIAS_TYPES = (TensorProto.INT32,)


# QOperator layers: input positions of (weight, weight scale, weight zero point, bias, input scale)
QOPS = {"QLinearConv": (3, 4, 5, 8, 1), "QGemm": (3, 4, 5, 6, 1), "QLinearMatMul": (3, 4, 5, None, 1)}


def qop_inputs(node):
    """A QOperator layer's weight and bias (what --last-layers and --biases train), or None for other nodes."""
    if node.op_type not in QOPS:
        return None
    w, _, _, b, _ = QOPS[node.op_type]
    return [node.input[w]] + ([node.input[b]] if b is not None and len(node.input) > b and node.input[b] else [])


def _channel_axis(node):
    """The output-channel axis of a QOperator weight (per-channel scales run along it)."""
    if node.op_type == "QGemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return 0 if node.op_type == "QLinearConv" else 1


@dataclass
class QTensor:
    name: str            # the quantized initializer
    role: str            # "weight" or "bias"
    scale: str
    zero_point: str
    axis: int
    dequantized: str     # the DequantizeLinear's output (what the layer reads)
    consumer: str = ""   # the op type reading it
    weight: str = None   # a bias: its layer's weight (a QTensor name), whose scale it follows
    input_scale: str = None  # QOperator: the layer's input scale (a bias is read at input scale x weight scale)
    activation_scale: str = None  # a QDQ bias: its layer's input activation scale (bias scale = it x weight scale)


def _axis(node):
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def quantized_tensors(model):
    """{initializer name: QTensor} of the DequantizeLinear nodes that read an int8/uint8/int32 initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers = {}
    for node in model.graph.node:
        for k, i in enumerate(node.input):
            consumers.setdefault(i, []).append((node, k))
    found = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        kind = inits[node.input[0]].data_type
        if kind not in WEIGHT_TYPES + BIAS_TYPES or node.input[1] not in inits:
            continue
        readers = consumers.get(node.output[0], [])
        found[node.input[0]] = QTensor(node.input[0], "weight" if kind in WEIGHT_TYPES else "bias", node.input[1],
                                       node.input[2] if len(node.input) > 2 else "", _axis(node), node.output[0],
                                       readers[0][0].op_type if readers else "")
    for node in model.graph.node:  # QOperator: the layer reads the quantized weight and bias itself
        if node.op_type not in QOPS or node.input[QOPS[node.op_type][0]] not in inits:
            continue
        w, ws, wz, b, xs = QOPS[node.op_type]
        ins = list(node.input)
        found[ins[w]] = QTensor(ins[w], "weight", ins[ws], ins[wz] if len(ins) > wz else "", _channel_axis(node),
                                None, node.op_type, input_scale=ins[xs])
        if b is not None and len(ins) > b and ins[b] in inits:
            found[ins[b]] = QTensor(ins[b], "bias", None, "", 0, None, node.op_type, weight=ins[w],
                                    input_scale=ins[xs])
    found.update(_dynamic(model, inits))
    by_output = {q.dequantized: q for q in found.values() if q.dequantized}
    dq_scale = {n.output[0]: n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for node in model.graph.node:  # a layer reading a quantized weight (input 1) and bias (input 2)
        ins = list(node.input)
        if len(ins) > 2 and ins[1] in by_output and ins[2] in by_output and by_output[ins[2]].role == "bias":
            by_output[ins[2]].weight = by_output[ins[1]].name
            by_output[ins[2]].activation_scale = dq_scale.get(ins[0])
    return found


def _activation_scales(model):
    inits = {t.name for t in model.graph.initializer}
    return list(dict.fromkeys(n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear"
                              and n.input[0] not in inits and n.input[1] in inits))


def activation_scales(model):
    """--activation-scales: the scales of the QuantizeLinear nodes that quantize activations (not initializers),
    in graph order: what calibration chose. Trained as log-factors, as weight scales are."""
    names = _activation_scales(model)
    check(names, "--activation-scales: the model has no quantized activations (QuantizeLinear of a computed tensor)")
    return names


from ..runtime.quant import dequantize, quantize, requantize_bias  # noqa: E402  (numpy; write-back on the device uses it too)


def _dynamic(model, inits):
    """quantize_dynamic's weights: an int8 initializer read by MatMulInteger (input 1, zero point input 3), whose
    scale is the float initializer multiplied with the DynamicQuantizeLinear's scale of the other input."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        if node.op_type != "MatMulInteger" or node.input[1] not in inits:
            continue
        source = producer.get(node.input[0])
        a_scale = source.output[1] if source is not None and source.op_type == "DynamicQuantizeLinear" else None
        scale = next((i for n in model.graph.node if n.op_type == "Mul" and a_scale in n.input
                      for i in n.input if i != a_scale and i in inits), None)
        if scale is None:
            continue
        zero_point = node.input[3] if len(node.input) > 3 and node.input[3] in inits else ""
        per_column = int(np.prod(inits[scale].dims)) > 1
        found[node.input[1]] = QTensor(node.input[1], "weight", scale, zero_point, 1 if per_column else 0, None,
                                       "MatMulInteger")
    return found


def describe(model):
    """--list lines for a quantized model: one per quantized layer input (weight/bias), with scales and zero
    points and their precision."""
    inits = {t.name: t for t in model.graph.initializer}
    lines = []
    for q in quantized_tensors(model).values():
        t = inits[q.name]
        kind = TensorProto.DataType.Name(t.data_type).lower()
        if q.scale is None:  # a QOperator bias
            lines.append(f"  bias   {q.name!r} {kind} {list(t.dims)} of {q.consumer}: read at input scale "
                         f"{q.input_scale!r} x {q.weight!r}'s scale")
            continue
        s = inits[q.scale]
        per = f"per-channel axis {q.axis} ({int(np.prod(s.dims))} scales)" if np.prod(s.dims) > 1 else "per-tensor"
        zp = ""
        if q.zero_point in inits:
            z = numpy_helper.to_array(inits[q.zero_point])
            zp = " symmetric (zero point 0)" if not np.any(z) else " asymmetric"
        lines.append(f"  {q.role:<6} {q.name!r} {kind} {list(t.dims)} of {q.consumer or '?'}: scale {q.scale!r} "
                     f"{per}{zp}" + (f"; follows {q.weight!r}'s scale" if q.weight else ""))
    return lines


def weight_scales(model):
    """--scales: the scale initializers of every quantized weight, in graph order (shared ones once)."""
    names = [q.scale for q in quantized_tensors(model).values() if q.role == "weight"]
    check(names, "--scales: the model has no quantized weights (DequantizeLinear of an int8/uint8 initializer)")
    return list(dict.fromkeys(names))


def _bias_nodes(q, b, weight_scale, factor, value, add_init):
    """A bias as float b (an initializer named b), quantized at its current scale: QDQ round(b / s) * s as the
    DequantizeLinear's output, s = bias scale0 (x exp(t) of a trained weight scale and of a trained input
    activation scale: `factor`, their graph values); QOperator int32
    round(b / (input scale x current weight scale)) as the layer's bias input."""
    if q.input_scale:  # QOperator
        scale0 = (value[q.input_scale] * value[weight_scale]).astype(np.float32)
        add_init(b, dequantize(value[q.name], scale0))
        current = f"{b}__scale"
        return [helper.make_node("Mul", [q.input_scale, weight_scale], [current]),
                helper.make_node("Div", [b, current], [f"{b}__steps"]),
                helper.make_node("Round", [f"{b}__steps"], [f"{b}__rounded"]),
                helper.make_node("Cast", [f"{b}__rounded"], [q.name], to=TensorProto.INT32)]
    add_init(b, dequantize(value[q.name], value[q.scale]))
    nodes, current = [], q.scale
    for k, f in enumerate(factor):  # the trained weight and input activation scales' factors
        nodes.append(helper.make_node("Mul", [current, f], [f"{q.scale}__current{k}"]))
        current = f"{q.scale}__current{k}"
    return nodes + [helper.make_node("Div", [b, current], [f"{b}__steps"]),
                    helper.make_node("Round", [f"{b}__steps"], [f"{b}__rounded"]),
                    helper.make_node("Mul", [f"{b}__rounded", current], [q.dequantized])]


def _dtype(model, name):
    return next(t.data_type for t in model.graph.initializer if t.name == name)


def prepare_quantized(model, names, adapted=()):
    """The model with each chosen quantized tensor or weight scale (in `names`) replaced by a float initializer
    plus the nodes that quantize it; returns (model, renamed {chosen name: float initializer name}, section for
    the manifest). Tied biases of trained scales are re-quantized too (see the module's docstring). `adapted`:
    quantized weights with LoRA adapters, whose frozen float value plus the adapters' delta (W__lora_merged, made
    by exporters.lora) is quantized at the weight's scale."""
    qmap = quantized_tensors(model)
    scales = {q.scale for q in qmap.values() if q.role == "weight"} | set(_activation_scales(model))
    chosen = [n for n in names if n in qmap or n in scales]
    both = sorted(set(chosen) & set(adapted))
    check(not both, f"{both[0] if both else ''!r}: train the int8 weight or its LoRA adapters, not both")
    if not chosen and not adapted:
        return model, {}, None
    model = prep.copy(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    value = {n: numpy_helper.to_array(inits[n]) for n in inits}
    renamed, section, nodes = {}, {"scales": [], "biases": [], "weights": []}, []

    def add_init(name, array):
        graph.initializer.append(numpy_helper.from_array(np.asarray(array, np.float32), name))

    factor = {}  # trained scale name -> the graph value of exp(t)
    for s in [n for n in chosen if n in scales]:
        check(_dtype(model, s) == TensorProto.FLOAT, f"--scales: {s!r} is not a float32 scale")
        t, base = f"{s}__log_factor", f"{s}__base"
        add_init(t, np.zeros_like(value[s], np.float32))
        inits[s].name = base
        nodes += [helper.make_node("Exp", [t], [f"{s}__factor"]), helper.make_node("Mul", [base, f"{s}__factor"], [s])]
        factor[s] = f"{s}__factor"
        renamed[s] = t
        section["scales"].append({"scale": s, "entry": t})
    for q in qmap.values():
        weight_scale = qmap[q.weight].scale if q.role == "bias" and q.weight in qmap else None
        activation = q.activation_scale if q.activation_scale in factor and not q.input_scale else None
        follows = weight_scale in factor
        if q.role == "bias" and (q.name in chosen or follows or activation):
            b = f"{q.name}__float"
            nodes += _bias_nodes(q, b, weight_scale, [factor[n] for n in (weight_scale, activation) if n in factor],
                                 value, add_init)
            if q.dequantized:  # QDQ: the float bias replaces the DequantizeLinear's output
                graph.node.remove(next(n for n in graph.node if n.op_type == "DequantizeLinear"
                                       and n.input[0] == q.name))
            graph.initializer.remove(inits[q.name])
            if q.name in chosen:
                renamed[q.name] = b
            section["biases"].append({"tensor": q.name, "scale": q.scale, "input_scale": q.input_scale,
                                      "weight_scale": weight_scale if follows or q.input_scale else None,
                                      "activation_scale": activation, "entry": b if q.name in chosen else None})
        elif q.role == "weight" and (q.name in chosen or q.name in adapted):
            w = f"{q.name}__float"
            zp = value.get(q.zero_point)
            add_init(w, dequantize(value[q.name], value[q.scale], zp, q.axis))
            check(q.zero_point or _dtype(model, q.name) == TensorProto.UINT8,
                  f"{q.name!r}: an int8 weight without a zero point (QuantizeLinear would make it uint8)")
            master = w if q.name in chosen else f"{q.name}__lora_merged"
            inputs = [master, q.scale] + ([q.zero_point] if q.zero_point else [])
            nodes.append(helper.make_node("QuantizeLinear", inputs, [q.name], axis=q.axis))
            graph.initializer.remove(inits[q.name])
            if q.name in chosen:
                renamed[q.name] = w
            section["weights"].append({"tensor": q.name, "scale": q.scale, "zero_point": q.zero_point or None,
                                       "axis": q.axis, "entry": w if q.name in chosen else None})
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    return prep.sort_nodes(model), renamed, section


HEAD_ROOM = 4  # a fresh int8 head's scale covers 4x its initial weights' range: room to grow before saturating


def fresh_int8_head(model, weight, classes, out_first, rng):
    """The quantized last layer `weight` (QDQ, QOperator or dynamic) replaced in place by a fresh seeded one with
    `classes` outputs, int8 from the start: uniform +-1/sqrt(fan_in) weights quantized symmetrically (per channel
    where the old head was) at a scale of HEAD_ROOM x their range, the int32 bias at input scale x that scale.
    --last-layers 1 then trains it as a float master quantized at that scale (--scales trains the scale)."""
    q, inits = quantized_tensors(model)[weight], {t.name: t for t in model.graph.initializer}
    arr = {n: numpy_helper.to_array(t) for n, t in inits.items()}
    readers = sum(i == q.scale for n in model.graph.node for i in n.input)
    check(readers == 1, f"--num-classes: the head's scale {q.scale!r} is shared with other layers")
    fan_in = arr[weight].shape[1] if out_first else arr[weight].shape[0]
    bound = 1 / np.sqrt(fan_in)
    w = rng.uniform(-bound, bound, (classes, fan_in) if out_first else (fan_in, classes)).astype(np.float32)
    channel = 0 if out_first else 1
    per_channel = arr[q.scale].size > 1
    reach = np.abs(w).max(axis=1 - channel) if per_channel else np.abs(w).max().reshape(arr[q.scale].shape)
    scale = (HEAD_ROOM * reach / 127).astype(np.float32)
    kind = arr[weight].dtype
    zero = np.full(scale.shape, 0 if kind == np.int8 else 128, kind) if q.zero_point else None
    new = {weight: quantize(w, scale, zero, channel, kind), q.scale: scale}
    if zero is not None:
        new[q.zero_point] = zero
    b = next((t for t in quantized_tensors(model).values() if t.role == "bias" and t.weight == weight), None)
    if b is not None:
        x_scale = arr[b.input_scale] if b.input_scale else np.float32(np.mean(arr[b.scale] / arr[q.scale]))
        b_scale = (x_scale * scale).astype(np.float32)
        bias = rng.uniform(-bound, bound, classes).astype(np.float32)
        new[b.name] = requantize_bias(bias, np.broadcast_to(b_scale, bias.shape), b.name)
        if b.scale:  # per tensor: the bias scale keeps its own shape ([] or [1])
            new[b.scale] = b_scale if per_channel else b_scale.reshape(arr[b.scale].shape)
        if b.zero_point:
            new[b.zero_point] = np.zeros(b_scale.shape, arr[b.zero_point].dtype)
    for name, value in new.items():
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return model
