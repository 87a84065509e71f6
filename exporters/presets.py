"""`edgezo export-onnx --list`: a model's tensors, and per layer what each selection preset would train."""
import numpy as np

from . import onnx_prepare as prep
from .lora import OPS as LORA_OPS, _sizes, lora_targets
from .onnx_import import _alias, _floats, bias_tensors, layers, list_tensors, norm_tensors, prepare
from .quant import describe as describe_quantized, qop_inputs, quantized_tensors

LORA_RANK = 4  # the rank the listing counts adapters at


def preset_rows(model):
    """Per node that reads float weights: {layer, op, params, last_k, norms, biases, lora}."""
    trainable = _floats(model)  # float weights, and quantized ones (trained as floats)
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer if t.name in trainable}
    alias = _alias(model)
    norms, biases = set(norm_tensors(model)), set(bias_tensors(model))
    order = [n.name or f"{n.op_type}#{i}" for i, n in enumerate(layers(model))]
    lora = {t["weight"]: LORA_RANK * sum(_sizes(t)) for t in _lora_or_empty(model)}
    rows, seen = [], set()
    for i, node in enumerate(model.graph.node):
        weights = [alias.get(n, n) for n in (qop_inputs(node) or node.input) if alias.get(n, n) in sizes]
        if not weights or node.op_type in ("Identity", "QuantizeLinear", "DequantizeLinear"):  # Q/DQ: at its layer
            continue
        name = node.name or f"{node.op_type}#{i}"
        fresh = [w for w in weights if w not in seen]
        seen.update(weights)
        rows.append({"layer": name, "op": node.op_type, "params": sum(sizes[w] for w in fresh),
                     "last_k": len(order) - order.index(name) if name in order else None,
                     "norms": sum(sizes[w] for w in fresh if w in norms),
                     "biases": sum(sizes[w] for w in fresh if w in biases),
                     "lora": lora.get(alias.get(node.input[1], node.input[1]), 0) if node.op_type in LORA_OPS else 0})
    return rows


def _lora_or_empty(model):
    try:
        return lora_targets(model)
    except Exception:  # no Gemm/MatMul/Conv weight: nothing for LoRA to count
        return []


def print_listing(original, path):
    model, constants = prepare(original, str(path))
    print(f"{path}: opset {prep.opset(original)}" + (f" (trained at {prep.opset(model)})"
                                                     if prep.opset(model) != prep.opset(original) else "")
          + (f"; {len(constants)} weights stored as Constant nodes (trainable, written back as Constants)"
             if constants else ""))
    inits = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name not in inits:
            print(f"input  {value.name}: {prep.dims(value)}")
    for value in model.graph.output:
        head = prep.output_head(model, value.name) if True else None
        said = f"  <- {head[2]} of logits {head[1]!r}: trains with {head[0]} on the logits" if head else ""
        print(f"output {value.name}: {prep.dims(value)}{said}")
    print(f"\n{'tensor':<40} {'shape':<18} {'dtype':<8} {'size':>9}  notes")
    for t in list_tensors(original):
        notes = []
        if len(t["feeds"]) > 1:
            notes.append(f"shared by {len(t['feeds'])} nodes: {', '.join(t['feeds'])}")
        if t["aliases"]:
            notes.append(f"aliases: {', '.join(t['aliases'])}")
        if t["constant"]:
            notes.append("Constant node")
        print(f"{t['name']:<40} {str(t['shape']):<18} {t['dtype']:<8} {t['size']:>9}  {'; '.join(notes)}")
    quantized = describe_quantized(model)
    if quantized:
        scales = {q.scale: 0 for q in quantized_tensors(model).values() if q.role == "weight"}
        count = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name in scales)
        print(f"\nquantized: {len(quantized)} tensors; --scales trains {count} weight scales "
              f"({len(scales)} tensors), --biases the int32 biases as floats, --last-layers / --trainable float "
              "master weights (re-quantized as deployed)")
        print("\n".join(quantized))
    rows = preset_rows(model)
    print(f"\n{'layer':<36} {'op':<20} {'params':>9} {'last-K':>6} {'--norms':>8} {'--biases':>8} "
          f"{f'--lora {LORA_RANK}':>9}")
    for r in rows:
        k = "" if r["last_k"] is None else str(r["last_k"])
        print(f"{r['layer']:<36} {r['op']:<20} {r['params']:>9} {k:>6} {r['norms']:>8} {r['biases']:>8} "
              f"{r['lora']:>9}")
    head = sum(r["params"] for r in rows if r["last_k"] == 1)
    print(f"{'total':<36} {'':<20} {sum(r['params'] for r in rows):>9} {head:>6} "
          f"{sum(r['norms'] for r in rows):>8} {sum(r['biases'] for r in rows):>8} {sum(r['lora'] for r in rows):>9}")
    print("(last-K: the --last-layers K that first includes the layer; its total column is --last-layers 1)")
