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
