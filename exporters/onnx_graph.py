"""ONNX graph surgery shared by every exporter (torch-free: onnx and numpy only).

- `flatten_trainable`: the chosen initializers become slices of one flat float32 graph input.
- `write_artifact`: the artifact folder, written atomically (a temp folder renamed into place).
- `write_back` (from runtime.writeback, torch-free): the inference graph with trained values.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.engine.graph import element_types
from ..runtime.errors import EdgezoError
from ..runtime.files import check_new_folder
from ..runtime.manifest import FORMAT_VERSION, validate
from ..runtime.writeback import edgezo_version, write_back  # noqa: F401  (exporters.write_back)

PARAMS_INPUT = "params"
OPSET = 18
_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.INT64: "int64",
           TensorProto.INT32: "int32", TensorProto.FLOAT16: "float16", TensorProto.INT8: "int8",
           TensorProto.UINT8: "uint8"}
TRAINABLE_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)  # fp16 weights train as float32 values cast in the graph


def value_info(value):
    """{name, shape (symbolic dims as strings, the first as "batch"), dtype} of a graph input/output."""
    t = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "batch") for d in t.shape.dim]
    if shape and isinstance(shape[0], str):
        shape[0] = "batch"
    dtype = _DTYPES.get(t.elem_type)
    if dtype is None:
        raise EdgezoError(f"graph value {value.name!r} has unsupported element type "
                          f"{TensorProto.DataType.Name(t.elem_type)}")
    return {"name": value.name, "shape": shape, "dtype": dtype}


def tensor_entry(tensor, offset=None):
    shape = [int(d) for d in tensor.dims]
    entry = {"name": tensor.name, "shape": shape, "dtype": _DTYPES.get(tensor.data_type, str(tensor.data_type)),
             "size": int(np.prod(shape, dtype=np.int64))}
    if offset is not None:
        entry["offset"] = offset
    return entry


def flatten_trainable(model, trainable):
    """Replace the initializers named in `trainable` (in that order) by slices of one flat input.

    Returns (new model, trainable entries, frozen entries, flat float32 initial vector).
    """
    graph = model.graph
    by_name = {t.name: t for t in graph.initializer}
    entries, chunks, offset = [], [], 0
    for name in trainable:
        tensor = by_name.get(name)
        if tensor is None:
            raise EdgezoError(f"trainable tensor {name!r} is not an initializer of the graph")
        if tensor.data_type not in TRAINABLE_TYPES:
            raise EdgezoError(f"trainable tensor {name!r} has type {TensorProto.DataType.Name(tensor.data_type)}; "
                              "only float32 and float16 tensors can be trained")
        entry = dict(tensor_entry(tensor, offset), dtype="float32")  # its slice of the flat float32 params
        if tensor.data_type != TensorProto.FLOAT:
            entry["stored"] = _DTYPES[tensor.data_type]
        entries.append(entry)
        chunks.append(numpy_helper.to_array(tensor).astype(np.float32).reshape(-1))
        offset += entry["size"]
    model = onnx.ModelProto.FromString(model.SerializeToString())  # leave the caller's model as it was
    graph = model.graph
    keep = [t for t in graph.initializer if t.name not in set(trainable)]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = []
    for e in entries:
        start, end, shape = f"{e['name']}__start", f"{e['name']}__end", f"{e['name']}__shape"
        graph.initializer.extend([numpy_helper.from_array(np.array([e["offset"]], np.int64), start),
                                  numpy_helper.from_array(np.array([e["offset"] + e["size"]], np.int64), end),
                                  numpy_helper.from_array(np.array(e["shape"], np.int64), shape)])
        flat, cast = f"{e['name']}__flat", "stored" in e
        shaped = f"{e['name']}__f32" if cast else e["name"]
        nodes += [helper.make_node("Slice", [PARAMS_INPUT, start, end], [flat], name=f"{e['name']}__slice"),
                  helper.make_node("Reshape", [flat, shape], [shaped], name=f"{e['name']}__reshape")]
        if cast:  # the deployed precision: training sees what deploys
            nodes.append(helper.make_node("Cast", [shaped], [e["name"]], to=TensorProto.FLOAT16,
                                          name=f"{e['name']}__cast"))
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    graph.input.insert(0, helper.make_tensor_value_info(PARAMS_INPUT, TensorProto.FLOAT, [offset]))
    frozen = [tensor_entry(t) for t in keep]
    params = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return model, entries, frozen, params


def check_model(model, what):
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise EdgezoError(f"{what} is not a valid ONNX model: {first}") from None


def build_manifest(*, trainable, frozen, inputs, targets, outputs, loss, files, source, pte_batch=None, lora=(),
                   quantized=None):
    manifest = {"format_version": FORMAT_VERSION, "num_params": sum(e["size"] for e in trainable),
                "params_input": PARAMS_INPUT, "trainable": trainable, "frozen": frozen, "inputs": inputs,
                "targets": targets, "outputs": outputs, "loss": loss, "files": files, "opset": OPSET,
                "source": dict(source, edgezo_version=edgezo_version())}
    if lora:
        manifest["lora"] = list(lora)  # adapters: merged into their weights at write-back
    if quantized:
        manifest["quantized"] = quantized  # how write-back stores trained scales, biases and weights quantized
    if pte_batch is not None:
        manifest["pte_batch"] = pte_batch  # an ExecuTorch program has a fixed batch size
    return validate(manifest, "manifest (being written)")


def write_artifact(out_dir, manifest, params, models, extra_files=()):
    """Write manifest.json, params.npy and the ONNX models {file name: ModelProto} into out_dir at once.

    Everything goes to a temporary sibling folder first, then is renamed into place: an error leaves
    no half-written artifact. `extra_files` are (name, writer(path)) pairs written into the same folder.
    """
    out_dir = check_new_folder(out_dir)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=parent))
    try:
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        np.save(tmp / manifest["files"]["params"], params.astype(np.float32))
        for name, model in models.items():  # loss.onnx typed: the device's engine cuts it without shape inference
            onnx.save(element_types(model) if name == "loss.onnx" else model, tmp / name)
        for name, writer in extra_files:
            writer(tmp / name)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
