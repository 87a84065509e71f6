"""An existing ONNX inference model -> artifact folder (torch-free: onnx, numpy, onnxruntime).

The chosen initializers become the flat trainable vector (one graph input), a loss is appended
after the model's output (on the logits where the output is a Softmax / Sigmoid), everything else
stays frozen. The original file is the artifact's inference.onnx (unless --num-classes gives it a new
head), so write-back gives the same graph with new values. Files from the wild are first made ready by
onnx_prepare (old opsets, Constant-node weights, aliases, fixed inputs, batch axes).
"""
import fnmatch
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.errors import EdgezoError, check
from ..runtime.loss import loss_nodes
from . import onnx_prepare as prep
from .lora import add_lora, lora_targets
from .quant import activation_scales as quantized_activation_scales
from .quant import fresh_int8_head, prepare_quantized, qop_inputs, quantized_tensors, weight_scales
from .onnx_graph import (TRAINABLE_TYPES, build_manifest, check_model, flatten_trainable, tensor_entry, value_info,
                         write_artifact)
from .smoke import smoke_test

LAYER_OPS = ("Gemm", "MatMul", "Conv", "ConvTranspose", "QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger")
NORM_OPS = ("BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization")
TARGET = "target"


def load_model(path):
    path = Path(path)
    check(path.is_file(), f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises DecodeError and others for non-ONNX bytes
        raise EdgezoError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    check(len(model.graph.node) > 0 and len(model.graph.output) > 0, f"{path}: not an ONNX model (empty graph)")
    check_model(prep.unknown_sizes(prep.sort_nodes(model)), str(path))
    return model


def prepare(model, what="the model"):
    """(model at opset >= 13 with Constant-node float weights as initializers, names that were Constants)."""
    return prep.constant_weights(prep.upgrade(model, what))


def list_tensors(model):
    """[{name, shape, dtype, size, feeds, aliases}] of the model's initializers (Constant-node weights
    included, marked constant=True), in graph order."""
    model, constants = prepare(model)
    feeds, alias = prep.feeds(model), prep.aliases(model)
    out = []
    for t in model.graph.initializer:
        entry = tensor_entry(t)
        entry.update(feeds=feeds.get(t.name, []), aliases=[a for a, src in alias.items() if src == t.name],
                     constant=t.name in constants)
        out.append(entry)
    return out


def _floats(model):
    """The trainable initializers: float32/float16 ones and quantized int8/int32 ones (trained as floats)."""
    return ({t.name for t in model.graph.initializer if t.data_type in TRAINABLE_TYPES}
            | set(quantized_tensors(model)))


def _alias(model):
    """Identity aliases, and a DequantizeLinear's output as its quantized initializer."""
    return {**prep.aliases(model), **{q.dequantized: q.name for q in quantized_tensors(model).values()}}


def _consumers(model):
    out = {}
    for node in model.graph.node:
        for i in node.input:
            out.setdefault(i, []).append(node)
    return out


def _bias_add(node, consumers):
    """The Add that alone follows a MatMul (its bias), or None; after a MatMulInteger, past its Cast and scale Mul."""
    if node.op_type not in ("MatMul", "MatMulInteger"):
        return None
    follow = consumers.get(node.output[0], [])
    while node.op_type == "MatMulInteger" and len(follow) == 1 and follow[0].op_type in ("Cast", "Mul"):
        follow = consumers.get(follow[0].output[0], [])
    return follow[0] if len(follow) == 1 and follow[0].op_type == "Add" else None


def _weights(node, floats, alias):
    """The trainable tensors a node reads (a QOperator layer: its weight and bias, not its scales)."""
    inputs = qop_inputs(node) or node.input
    return [alias.get(i, i) for i in inputs if alias.get(i, i) in floats]


def layers(model):
    """The Gemm/MatMul/Conv nodes with float initializer weights, in graph order."""
    floats, alias = _floats(model), _alias(model)
    return [n for n in model.graph.node if n.op_type in LAYER_OPS and _weights(n, floats, alias)]


def last_layer_tensors(model, k):
    """The float initializers of the last k Gemm/MatMul/Conv nodes (with a MatMul's bias Add)."""
    check(isinstance(k, int) and k >= 1, f"--last-layers must be >= 1, got {k}")
    floats, alias, consumers = _floats(model), _alias(model), _consumers(model)
    found = layers(model)
    check(found, "the model has no Gemm/MatMul/Conv layer with float or quantized weights (initializers or "
                 "Constant nodes)")
    check(k <= len(found), f"--last-layers {k}: the model has only {len(found)} such layers")
    names = []
    for node in found[-k:]:
        names += _weights(node, floats, alias)
        add = _bias_add(node, consumers)
        if add is not None:
            names += _weights(add, floats, alias)
    return list(dict.fromkeys(names))


def norm_tensors(model):
    """Scale and shift of every BatchNorm / LayerNorm / InstanceNorm / GroupNorm (--norms)."""
    floats, alias = _floats(model), _alias(model)
    names = []
    for node in model.graph.node:
        if node.op_type in NORM_OPS:
            names += [alias.get(i, i) for i in node.input[1:3] if alias.get(i, i) in floats]
    return list(dict.fromkeys(names))


def bias_tensors(model):
    """Every bias (--biases, BitFit): Gemm C, Conv B, the 1-D Add after a MatMul, norm shifts."""
    floats, alias, consumers = _floats(model), _alias(model), _consumers(model)
    names = []
    for node in model.graph.node:
        picks, add = [], _bias_add(node, consumers)
        if node.op_type in ("Gemm", "Conv", "ConvTranspose") and len(node.input) > 2:
            picks = [node.input[2]]
        elif qop_inputs(node):
            picks = qop_inputs(node)[1:]
        elif add is not None:
            picks = [i for i in add.input if i != node.output[0]]
        elif node.op_type in NORM_OPS and len(node.input) > 2:
            picks = [node.input[2]]
        names += [alias.get(i, i) for i in picks if alias.get(i, i) in floats]
    shapes = {t.name: len(t.dims) for t in model.graph.initializer}
    return list(dict.fromkeys(n for n in names if shapes[n] == 1))


def select_tensors(model, patterns):
    """Initializer names matching any glob pattern (on its name or an Identity alias's), in graph order."""
    by_name = {t.name: t for t in model.graph.initializer}
    alias, trainable_names = prep.aliases(model), _floats(model)
    names_of = {n: [n] + [a for a, src in alias.items() if src == n] for n in by_name}

    def hit(name, pattern):
        return any(fnmatch.fnmatchcase(a, pattern) for a in names_of[name])
    chosen = set()
    for pattern in patterns:
        hits = [n for n in by_name if hit(n, pattern)]
        check(hits, f"--trainable {pattern!r} matches no tensor of the model (see --list)")
        if any(c in pattern for c in "*?["):  # a glob takes the float tensors it matches (not shape constants)
            floats = [n for n in hits if n in trainable_names]
            check(floats, f"--trainable {pattern!r} matches only non-float tensors ({hits[0]!r}, ...)")
            hits = floats
        for name in hits:
            check(name in trainable_names,
                  f"--trainable {pattern!r}: tensor {name!r} is "
                  f"{TensorProto.DataType.Name(by_name[name].data_type)}, only float32 and float16 tensors and quantized "
                  "weights and biases (read by a DequantizeLinear) can be trained")
        chosen.update(hits)
    return [n for n in by_name if n in chosen]


def choose(model, trainable=None, last_layers=None, norms=False, biases=False, scales=False, activation_scales=False):
    """The union of the selections given, in graph order; at least one must be given."""
    check(trainable or last_layers or norms or biases or scales or activation_scales, "choose what to train: "
          "--trainable PATTERN..., --last-layers K, --norms, --biases, --scales, --activation-scales (quantized "
          "models) and/or --lora R")
    names = weight_scales(model) if scales else []
    names += quantized_activation_scales(model) if activation_scales else []
    if trainable:
        names += select_tensors(model, trainable)
    if last_layers is not None:
        names += last_layer_tensors(model, last_layers)
    if norms:
        found = norm_tensors(model)
        check(found, "--norms: the model has no BatchNorm/LayerNorm/InstanceNorm/GroupNorm with float weights")
        names += found
    if biases:
        found = bias_tensors(model)
        check(found, "--biases: the model has no bias tensors (Gemm C, Conv B, Add after MatMul, norm shifts)")
        names += found
    order = {t.name: i for i, t in enumerate(model.graph.initializer)}
    return sorted(set(names), key=order.get)


def shared_notices(model, names):
    """One line per chosen tensor that several nodes read (directly or through Identity aliases)."""
    feeds = prep.feeds(model)
    return [f"note: {n!r} is shared by {len(feeds[n])} nodes ({', '.join(feeds[n])}): it trains as one tensor"
            for n in names if len(feeds.get(n, [])) > 1]


def check_not_in_subgraphs(model, names):
    inside = sorted(set(names) & prep.subgraph_initializer_uses(model))
    if inside:
        raise EdgezoError(f"{inside[0]!r} is read inside an If/Loop subgraph: weights used in control-flow bodies "
                          "cannot be trained (choose other tensors)")


def new_head(model, classes, seed=0):
    """The model with its last Gemm/MatMul layer replaced by a fresh, seeded one with `classes` outputs."""
    check(isinstance(classes, int) and classes >= 2, f"--num-classes must be >= 2, got {classes}")
    model = prep.copy(model)
    classifiers = ("Gemm", "MatMul", "QGemm", "QLinearMatMul", "MatMulInteger")
    found = [n for n in layers(model) if n.op_type in classifiers]
    check(found, "--num-classes: the model has no Gemm/MatMul classifier layer to replace")
    node, floats, alias = found[-1], _floats(model), _alias(model)
    by_name = {t.name: t for t in model.graph.initializer}
    weight = alias.get(node.input[1], node.input[1])
    if node.op_type in ("QGemm", "QLinearMatMul"):
        weight = node.input[3]
    check(weight in floats, f"--num-classes: the last layer {node.name or node.op_type!r} has no weight initializer")
    w = numpy_helper.to_array(by_name[weight])
    out_first = node.op_type in ("Gemm", "QGemm") and any(a.name == "transB" and a.i for a in node.attribute)
    fan_in = w.shape[1] if out_first else w.shape[0]
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(fan_in)
    if by_name[weight].data_type in TRAINABLE_TYPES:
        fresh = rng.uniform(-bound, bound, (classes, fan_in) if out_first else (fan_in, classes)).astype(w.dtype)
        by_name[weight].CopyFrom(numpy_helper.from_array(fresh, weight))  # fp16 stays fp16
    else:
        fresh_int8_head(model, weight, classes, out_first, rng)
    bias = None
    if node.op_type == "Gemm" and len(node.input) > 2:
        bias = alias.get(node.input[2], node.input[2])
    else:
        add = _bias_add(node, _consumers(model))
        if add is not None:
            bias = next((alias.get(i, i) for i in add.input if alias.get(i, i) in floats), None)
    if bias is not None and by_name[bias].data_type in TRAINABLE_TYPES:  # (an int32 bias: fresh_int8_head's)
        kind = helper.tensor_dtype_to_np_dtype(by_name[bias].data_type)
        by_name[bias].CopyFrom(numpy_helper.from_array(rng.uniform(-bound, bound, classes).astype(kind), bias))
    old = w.shape[0] if out_first else w.shape[1]
    for value in model.graph.output:  # the class axis changes size
        d = value.type.tensor_type.shape.dim
        if d and d[-1].HasField("dim_value") and d[-1].dim_value == old:
            d[-1].dim_value = classes
    del model.graph.value_info[:]
    return model


def append_loss(model, loss, output, head, target_name=TARGET):
    """A copy of `model` with a target input and the loss graph of runtime/loss.py: outputs 'loss', the model's
    output, 'losses' (per sample). `head`: (kind, logits, op) from onnx_prepare.output_head, or None (the loss
    reads the output)."""
    model = prep.copy(model)
    graph = model.graph
    scores = head[1] if head else output
    out = next(o for o in graph.output if o.name == output)
    out_shape = value_info(out)["shape"]
    classes = None
    if loss == "cross_entropy":
        check(len(out_shape) == 2 and isinstance(out_shape[1], int),
              f"--loss cross_entropy needs an output of shape [batch, classes]; {output!r} has {out_shape}")
        classes = out_shape[1]
        target = helper.make_tensor_value_info(target_name, TensorProto.INT64, ["batch"])
    else:
        target = helper.make_tensor_value_info(target_name, TensorProto.FLOAT, out_shape)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if out.type.tensor_type.elem_type != TensorProto.FLOAT:  # an fp16 model's output: the loss in float32
        graph.node.append(helper.make_node("Cast", [scores], [scores + "__f32"], to=TensorProto.FLOAT))
        scores += "__f32"
    graph.node.extend(loss_nodes(loss, scores, target_name, len(out_shape), opset))
    graph.input.append(target)
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("loss", TensorProto.FLOAT, []), out,
                         helper.make_tensor_value_info("losses", TensorProto.FLOAT, [out_shape[0]])])
    return model, classes


def pick_loss(model, loss, output):
    """(loss kind, head or None, what to tell the user). A Softmax/LogSoftmax output trains with cross-entropy on
    its logits, a Sigmoid with binary cross-entropy on its logits; --loss mse keeps the output itself."""
    head = prep.output_head(model, output)
    if head is None:
        check(loss is not None, f"give --loss (mse or cross_entropy): the output {output!r} has no Softmax/Sigmoid")
        check(loss != "binary_cross_entropy", f"--loss binary_cross_entropy needs a Sigmoid output; {output!r} "
                                              "has none")
        return loss, None, f"loss: {loss} on the output {output!r}"
    kind, logits, op = head
    if loss == "mse":
        return "mse", None, f"loss: mse on the output {output!r} ({op} probabilities, as asked)"
    check(loss in (None, kind), f"--loss {loss}: the output {output!r} ends in {op}, which trains with {kind} on "
                                f"its logits (or give --loss mse)")
    return kind, head, f"loss: {kind} on the logits {logits!r} before the output's {op} (exact, finite)"


def export_onnx(model_path, out_dir, loss=None, trainable=None, last_layers=None, output=None, norms=False,
                biases=False, scales=False, lora=None, lora_targets_glob=None, num_classes=None, fix_input=None, batch_axis=None,
                seed=0, log=print, config=None, sample_data=None, activation_scales=False):
    """Make an artifact from an ONNX inference model. Choose tensors with `trainable` globs, `last_layers`,
    `norms`, `biases` (combinable) and/or `lora` rank (adapters beside `lora_targets_glob` layers). `config`: an
    exporters.config.ExportConfig instead of the keywords."""
    if config is not None:
        return export_onnx(model_path, out_dir, log=log, **config.arguments())
    original = load_model(model_path)
    if num_classes is not None:  # the new head goes into inference.onnx too (then at opset >= 13)
        original = new_head(prepare(original, str(model_path))[0], num_classes, seed)
    model, constants = prepare(original, str(model_path))
    outputs = [o.name for o in model.graph.output]
    output = output or outputs[0]
    check(output in outputs, f"--output {output!r} is not an output of the model ({outputs})")
    selected = trainable or last_layers or norms or biases or scales or activation_scales
    names = choose(model, trainable, last_layers, norms, biases, scales, activation_scales) if selected or not lora \
        else []
    adapters = lora_targets(model, lora_targets_glob) if lora else []
    check_not_in_subgraphs(model, names + [a["weight"] for a in adapters])
    for line in shared_notices(model, names):
        log(line)
    loss, head, said = pick_loss(model, loss, output)
    log(said)
    model = _trim_outputs(model, output)
    fixed = prep.parse_fixed(fix_input, model)
    init_names = {t.name for t in model.graph.initializer}
    data_inputs = [i for i in model.graph.input if i.name not in init_names and i.name not in fixed]
    check(data_inputs, "every graph input is fixed: at least one must carry the data")
    axes = prep.batch_axes(model, data_inputs, prep.parse_batch_axes(batch_axis))
    model = prep.fix_inputs(model, fixed, data_inputs[0], axes[data_inputs[0].name])
    model, moved = prep.batch_first(model, axes)
    if output in moved:
        check(head is None, f"the output {output!r} has its batch on axis {axes[output]}: give an output with the "
                            "batch first for a Softmax/Sigmoid head")
    model = _batch_dims(model, [i.name for i in data_inputs] + [output])
    if lora:
        model, adapters = add_lora(model, adapters, lora, seed)
        names = names + [e for a in adapters for e in (a["A"], a["B"])]
    with_loss, classes = append_loss(model, loss, moved.get(output, output), head)
    with_loss, renamed, quantized = prepare_quantized(with_loss, names, [a["weight"] for a in adapters
                                                                        if a.get("quantized")])
    loss_model, entries, frozen, flat = flatten_trainable(with_loss, [renamed.get(n, n) for n in names])
    for e in entries:
        if e["name"] in renamed.values():
            e["quantized"] = True  # its value is stored quantized (manifest "quantized" says how)
    check_model(loss_model, "the loss graph built from the model")
    inputs = [i for i in loss_model.graph.input if i.name in {d.name for d in data_inputs}]
    out = next(o for o in loss_model.graph.output if o.name not in ("loss", "losses"))
    smoke_test(loss_model, model_path, sample_data, log)
    target_shape = ["batch"] + ([] if loss == "cross_entropy" else value_info(out)["shape"][1:])
    loss_info = {"kind": loss, "output": "loss", "per_sample": "losses", "num_classes": classes}
    if head:
        loss_info.update(logits=head[1], head=head[2])
    manifest = build_manifest(
        trainable=entries, frozen=frozen, inputs=[value_info(v) for v in inputs],
        targets=[{"name": TARGET, "shape": target_shape, "dtype": "int64" if loss == "cross_entropy" else "float32"}],
        outputs=[value_info(out)], loss=loss_info,
        files={"loss": "loss.onnx", "inference": "inference.onnx", "params": "params.npy"},
        source={"kind": "onnx", "model": str(Path(model_path).resolve()), "constants": sorted(constants),
                "fixed_inputs": sorted(fixed), "batch_axes": {k: v for k, v in axes.items() if v},
                "num_classes": num_classes},
        lora=adapters, quantized=quantized)
    return write_artifact(out_dir, manifest, flat, {"loss.onnx": loss_model, "inference.onnx": original})


def _trim_outputs(model, output):
    model = prep.copy(model)
    keep = [o for o in model.graph.output if o.name == output]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    return model


def _batch_dims(model, names):
    """The batch axis (first, after batch_first) of these inputs/outputs named 'batch'; other symbolic
    dims keep their names, unnamed ones get one."""
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name not in names:
            continue
        d = value.type.tensor_type.shape.dim
        check(len(d) > 0, f"graph value {value.name!r} has no axes: it cannot carry a batch")
        d[0].ClearField("dim_value")
        d[0].dim_param = "batch"
        for k, dim in enumerate(d[1:], start=1):
            if not dim.HasField("dim_value") and not dim.dim_param:
                dim.dim_param = f"{value.name}_dim{k}"
    return model
