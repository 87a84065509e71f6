"""Write-back: the deployed inference model with trained values (torch-free: onnx and numpy only).

Trainable tensors go back where the model keeps them (initializers, or Constant nodes for files that store
weights that way); LoRA adapters are merged into their weights, so the file keeps its graph and size.
"""
import json

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import EdgezoError, check
from .files import atomic_write
from .quant import dequantize, quantize, requantize_bias


def edgezo_version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("edgezo")
    except PackageNotFoundError:
        return "0+unknown"


def delta(target, a, b):
    """delta(B @ A) in W's layout (numpy)."""
    product = b.astype(np.float32) @ a.astype(np.float32)
    if target["layout"] == "in_out":
        return product.T
    return product.reshape(target["shape"])


def merge(weights, lora, values):
    """{weight name: W + delta} for each adapter, from {name: array} of the weights and of the trained A, B."""
    return {t["weight"]: (weights[t["weight"]] + delta(t, values[t["A"]], values[t["B"]])).astype(np.float32)
            for t in lora}


def quantized_updates(section, tensors, values):
    """{tensor name: array in its own precision} for a quantized model's trained scales, biases and weights (the
    manifest's "quantized" section; `values`: {entry name: float32 array})."""
    def own(name):
        return numpy_helper.to_array(tensors[name])
    updates, factor = {}, {}
    for s in section["scales"]:
        factor[s["scale"]] = np.exp(values[s["entry"]]).astype(np.float32)
        scale = (own(s["scale"]) * factor[s["scale"]]).astype(np.float32)
        check(np.all(np.isfinite(scale)) and np.all(scale > 0), f"the trained scale {s['scale']!r} is not a "
              f"positive finite float32 (min {scale.min():.3g}): it cannot be written back")
        updates[s["scale"]] = scale
    for b in section["biases"]:
        q0 = own(b["tensor"])
        if b.get("input_scale"):  # QOperator: read at input scale x weight scale (no scale tensor of its own)
            x = own(b["input_scale"])
            scale0 = (x * own(b["weight_scale"])).astype(np.float32)
            scale = (updates.get(b["input_scale"], x) * updates.get(b["weight_scale"], own(b["weight_scale"]))
                     ).astype(np.float32)
        else:
            scale0 = scale = own(b["scale"])
            for trained in (b["weight_scale"], b.get("activation_scale")):  # the bias follows both factors
                scale = (scale * factor[trained]).astype(np.float32) if trained else scale
            updates[b["scale"]] = scale.reshape(scale0.shape)
        value = values[b["entry"]] if b["entry"] else dequantize(q0, scale0)
        updates[b["tensor"]] = requantize_bias(value, scale, b["tensor"]).reshape(q0.shape)
    for w in section["weights"]:
        scale = updates.get(w["scale"], own(w["scale"]))
        zp = own(w["zero_point"]) if w["zero_point"] else None
        kind = np.int8 if zp is None and own(w["tensor"]).dtype == np.int8 else own(w["tensor"]).dtype
        value = values[w["entry"]] if w["entry"] else values[w["tensor"]]  # no entry: the LoRA-merged float
        updates[w["tensor"]] = quantize(value, scale, zp, w["axis"], kind)
    return updates


def write_back(inference_path, trainable, params, out_path, metadata=None, lora=(), quantized=None):
    """The inference model at `inference_path` with the trainable tensors set from `params`: initializers
    or Constant nodes (written back as Constant nodes); LoRA adapters merged into their weights; a quantized
    model's trained scales, biases and weights stored in its own precision (int8 stays int8)."""
    model = onnx.load(str(inference_path))
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] not in tensors:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                tensors[node.output[0]] = value
    values = {e["name"]: np.asarray(params[e["offset"]:e["offset"] + e["size"]], np.float32).reshape(e["shape"])
              for e in trainable}
    factors = {name for t in lora for name in (t["A"], t["B"])}
    factors |= {e["name"] for e in trainable if e.get("quantized")}
    updates = {name: v for name, v in values.items() if name not in factors}
    weights, int8 = {}, {w["tensor"]: w for w in (quantized or {}).get("weights", ()) if not w["entry"]}
    for t in lora:
        check(t["weight"] in tensors, f"{inference_path}: has no weight {t['weight']!r} for a LoRA adapter")
        weights[t["weight"]] = updates.get(t["weight"], numpy_helper.to_array(tensors[t["weight"]]))
        if t["weight"] in int8:  # the int8 weight's float value (its deployed scale), the merge re-quantized below
            w, own = int8[t["weight"]], lambda n: numpy_helper.to_array(tensors[n]) if n else None
            weights[t["weight"]] = dequantize(own(w["tensor"]), own(w["scale"]), own(w["zero_point"]), w["axis"])
    merged = merge(weights, lora, values)
    updates.update({k: v for k, v in merged.items() if k not in int8})
    if quantized:
        updates.update(quantized_updates(quantized, tensors, {**values, **merged}))
    for name, value in updates.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise EdgezoError(f"{inference_path}: has no initializer or Constant {name!r} listed in the manifest")
        check(list(tensor.dims) == list(value.shape), f"{inference_path}: {name!r} has shape {list(tensor.dims)}, "
                                                      f"the manifest {list(value.shape)}")
        own = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)  # fp16 stays fp16
        tensor.CopyFrom(numpy_helper.from_array(value.astype(own, copy=False), tensor.name))
    info = {"edgezo_version": edgezo_version(), **(metadata or {})}
    keep = [p for p in model.metadata_props if not p.key.startswith("edgezo")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in info.items():
        model.metadata_props.add(key=f"edgezo.{key}" if key != "edgezo_version" else "edgezo.version",
                                 value=value if isinstance(value, str) else json.dumps(value))
    atomic_write(out_path, lambda path: onnx.save(model, str(path)))
    return out_path
