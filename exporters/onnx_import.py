"""An existing ONNX inference model -> artifact folder (torch-free: onnx, numpy, onnxruntime).

The chosen initializers become the flat trainable vector (one graph input), a loss is appended
after the model's output, everything else stays frozen. The original file is the artifact's
inference.onnx, so write-back gives the same graph with new values.
"""
import fnmatch
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..runtime.errors import EdgezoError, check
from .onnx_graph import (build_manifest, check_model, flatten_trainable, tensor_entry, value_info,
                         write_artifact)

LAYER_OPS = ("Gemm", "MatMul", "Conv", "ConvTranspose")
TARGET = "target"


def load_model(path):
    path = Path(path)
    check(path.is_file(), f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises DecodeError and others for non-ONNX bytes
        raise EdgezoError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    check(len(model.graph.node) > 0 and len(model.graph.output) > 0, f"{path}: not an ONNX model (empty graph)")
    check_model(model, str(path))
    return model


def list_tensors(model):
    """[{name, shape, dtype, size}] of the model's initializers, in graph order."""
    return [tensor_entry(t) for t in model.graph.initializer]


def _initializer_inputs(node, names):
    return [i for i in node.input if i in names]


def last_layer_tensors(model, k):
    """The float initializers of the last k Gemm/MatMul/Conv nodes (with a MatMul's bias Add)."""
    check(isinstance(k, int) and k >= 1, f"--last-layers must be >= 1, got {k}")
    floats = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    consumers = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    layers = [n for n in model.graph.node if n.op_type in LAYER_OPS and _initializer_inputs(n, floats)]
    check(layers, "the model has no Gemm/MatMul/Conv layer with initializer weights")
    check(k <= len(layers), f"--last-layers {k}: the model has only {len(layers)} such layers")
    names = []
    for node in layers[-k:]:
        names += _initializer_inputs(node, floats)
        follow = consumers.get(node.output[0], [])
        if node.op_type == "MatMul" and len(follow) == 1 and follow[0].op_type == "Add":
            names += _initializer_inputs(follow[0], floats)
    return list(dict.fromkeys(names))


def select_tensors(model, patterns):
    """Initializer names matching any glob pattern, in graph order; every pattern must match."""
    by_name = {t.name: t for t in model.graph.initializer}
    for pattern in patterns:
        hits = [n for n in by_name if fnmatch.fnmatchcase(n, pattern)]
        check(hits, f"--trainable {pattern!r} matches no tensor of the model (see --list)")
        for name in hits:
            check(by_name[name].data_type == TensorProto.FLOAT,
                  f"--trainable {pattern!r}: tensor {name!r} is "
                  f"{TensorProto.DataType.Name(by_name[name].data_type)}, only float32 tensors can be trained")
    return [n for n in by_name if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _opset(model):
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _set_batch(value):
    dims = value.type.tensor_type.shape.dim
    check(len(dims) > 0, f"graph value {value.name!r} has no batch dimension")
    dims[0].ClearField("dim_value")
    dims[0].dim_param = "batch"


def append_loss(model, loss, output=None):
    """A copy of `model` with a target input and a scalar 'loss' output before the model's outputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    outputs = {o.name: o for o in graph.output}
    output = output or graph.output[0].name
    check(output in outputs, f"--output {output!r} is not an output of the model ({list(outputs)})")
    init_names = {t.name for t in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in init_names]
    del graph.input[:]
    graph.input.extend(real_inputs)
    for value in list(real_inputs) + list(graph.output):
        _set_batch(value)
    out = outputs[output]
    out_shape = [d.dim_value if d.HasField("dim_value") else "batch" for d in out.type.tensor_type.shape.dim]
    if loss == "mse":
        target = helper.make_tensor_value_info(TARGET, TensorProto.FLOAT, ["batch"] + out_shape[1:])
        nodes = [helper.make_node("Sub", [output, TARGET], ["loss__diff"]),
                 helper.make_node("Mul", ["loss__diff", "loss__diff"], ["loss__sq"]),
                 helper.make_node("ReduceMean", ["loss__sq"], ["loss"], keepdims=0)]
        classes = None
    elif loss == "cross_entropy":
        check(len(out_shape) == 2 and isinstance(out_shape[1], int),
              f"--loss cross_entropy needs an output of shape [batch, classes]; {output!r} has {out_shape}")
        check(_opset(model) >= 12, f"--loss cross_entropy needs opset >= 12, the model has {_opset(model)}")
        target = helper.make_tensor_value_info(TARGET, TensorProto.INT64, ["batch"])
        nodes = [helper.make_node("SoftmaxCrossEntropyLoss", [output, TARGET], ["loss"], reduction="mean")]
        classes = out_shape[1]
    else:
        raise EdgezoError(f"--loss must be mse or cross_entropy, got {loss!r}")
    graph.node.extend(nodes)
    graph.input.append(target)
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("loss", TensorProto.FLOAT, []), out])
    return model, classes, real_inputs, out


def export_onnx(model_path, out_dir, loss, trainable=None, last_layers=None, output=None):
    """Make an artifact from an ONNX inference model. Give `trainable` glob patterns or `last_layers`."""
    model = load_model(model_path)
    check((trainable is None) != (last_layers is None), "give either --trainable PATTERN... or --last-layers K")
    names = select_tensors(model, trainable) if trainable is not None else last_layer_tensors(model, last_layers)
    with_loss, classes, inputs, out = append_loss(model, loss, output)
    loss_model, entries, frozen, flat = flatten_trainable(with_loss, names)
    check_model(loss_model, "the loss graph built from the model")
    _smoke_test(loss_model, inputs, out, loss, classes, model_path)
    target_shape = ["batch"] + ([] if loss == "cross_entropy" else value_info(out)["shape"][1:])
    manifest = build_manifest(
        trainable=entries, frozen=frozen, inputs=[value_info(v) for v in inputs],
        targets=[{"name": TARGET, "shape": target_shape, "dtype": "int64" if loss == "cross_entropy" else "float32"}],
        outputs=[value_info(out)], loss={"kind": loss, "output": "loss", "num_classes": classes},
        files={"loss": "loss.onnx", "inference": "inference.onnx", "params": "params.npy"},
        source={"kind": "onnx", "model": str(Path(model_path).resolve())})
    return write_artifact(out_dir, manifest, flat, {"loss.onnx": loss_model, "inference.onnx": model})


def _smoke_test(loss_model, inputs, out, loss, classes, model_path):
    """Run the loss graph on a batch of 2 zeros: catches fixed batch sizes and other mismatches."""
    import onnxruntime as ort
    try:
        session = ort.InferenceSession(loss_model.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {}
        for i in session.get_inputs():
            shape = [2 if not isinstance(d, int) else d for d in i.shape]
            dtype = {"tensor(float)": np.float32, "tensor(int64)": np.int64}.get(i.type, np.float32)
            feed[i.name] = np.zeros(shape, dtype)
        session.run(["loss"], feed)
    except Exception as e:  # onnxruntime's own exception types
        first = str(e).strip().splitlines()[0][:200]
        raise EdgezoError(f"{model_path}: the loss graph does not run on a batch of 2 (fixed batch size, or a "
                          f"target that does not fit the output?): {first}") from None
