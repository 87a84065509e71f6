"""The one loss definition: the per-sample losses of each built-in kind, and which tensor the loss reads."""
import numpy as np

KINDS = ("mse", "cross_entropy", "binary_cross_entropy")


def per_sample_losses(out, target, kind):
    """out [P, ...] model outputs of P samples, target [P, ...] -> P losses (float64). The batch loss
    (mean over samples, and over outputs for mse) is their mean."""
    if kind == "mse":
        diff = out.astype(np.float64) - target
        return (diff * diff).reshape(len(out), -1).mean(axis=1)
    if kind == "binary_cross_entropy":  # on logits z: max(z, 0) - z y + log(1 + exp(-|z|))
        z = out.astype(np.float64)
        return (np.maximum(z, 0) - z * target + np.log1p(np.exp(-np.abs(z)))).reshape(len(out), -1).mean(axis=1)
    z = out.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return np.log(np.exp(z).sum(axis=-1)) - np.take_along_axis(z, target[:, None], axis=-1)[:, 0]


def scores_name(manifest):
    """The tensor the loss reads: the logits before a Softmax/Sigmoid output, else the model output."""
    return manifest["loss"].get("logits") or manifest["outputs"][0]["name"]


def reduce_mean(x, out, axes, opset, keepdims=0, prefix="loss__"):
    """Nodes: `out` = the mean of `x` over `axes` (None: all); the axes are an attribute before opset 18, an
    input from 18 on."""
    from onnx import helper, numpy_helper
    if axes is None:
        return [helper.make_node("ReduceMean", [x], [out], keepdims=keepdims)]
    if opset >= 18:
        name = f"{prefix}axes_{out}"
        return [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(axes, np.int64), name)),
                helper.make_node("ReduceMean", [x, name], [out], keepdims=keepdims)]
    return [helper.make_node("ReduceMean", [x], [out], axes=list(axes), keepdims=keepdims)]


def loss_nodes(kind, scores, target, rank, opset):
    """The one loss graph: nodes computing the per-sample 'losses' [batch] of a built-in `kind` from `scores`
    (the output or the logits, of rank `rank`) and `target` (class indices for cross_entropy), and the scalar
    'loss', their mean. ONNX import and torch export append these; the device engine reduces 'losses' per copy."""
    from onnx import helper

    def row_mean(each):  # mean over every axis but the batch
        if rank == 1:
            return [helper.make_node("Identity", [each], ["losses"])]
        return reduce_mean(each, "losses", list(range(1, rank)), opset)
    mean = reduce_mean("losses", "loss", None, opset)
    if kind == "mse":
        return [helper.make_node("Sub", [scores, target], ["loss__diff"]),
                helper.make_node("Mul", ["loss__diff", "loss__diff"], ["loss__sq"])] + row_mean("loss__sq") + mean
    if kind == "cross_entropy":
        return [helper.make_node("SoftmaxCrossEntropyLoss", [scores, target], ["losses"], reduction="none")] + mean
    if kind != "binary_cross_entropy":
        raise ValueError(f"loss kind must be one of {KINDS}, got {kind!r}")
    # binary cross-entropy on logits z: max(z, 0) - z y + log(1 + exp(-|z|)), as per_sample_losses
    return [helper.make_node("Relu", [scores], ["loss__pos"]), helper.make_node("Mul", [scores, target], ["loss__zy"]),
            helper.make_node("Abs", [scores], ["loss__abs"]), helper.make_node("Neg", ["loss__abs"], ["loss__neg"]),
            helper.make_node("Softplus", ["loss__neg"], ["loss__sp"]),
            helper.make_node("Sub", ["loss__pos", "loss__zy"], ["loss__a"]),
            helper.make_node("Add", ["loss__a", "loss__sp"], ["loss__each"])] + row_mean("loss__each") + mean
