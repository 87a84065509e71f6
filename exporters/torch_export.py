"""torch.nn.Module + loss -> artifact folder (DESIGN.md, "The artifact")."""
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from onnx.utils import Extractor

from ..runtime.errors import EdgezoError, check
from .onnx_import import append_loss
from .onnx_graph import build_manifest, check_model, flatten_trainable, value_info, write_artifact

LOSSES = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy,
          "binary_cross_entropy": F.binary_cross_entropy_with_logits}
PREFIX = "model."


class _WithLoss(torch.nn.Module):
    """(loss, output) or, with a per-sample loss function, (loss = mean of the losses, output, losses)."""

    def __init__(self, model, loss_fn, n_inputs, each=False):
        super().__init__()
        self.model, self.loss_fn, self.n_inputs, self.each = model, loss_fn, n_inputs, each

    def forward(self, *args):
        out = self.model(*args[:self.n_inputs])
        if self.loss_fn is None:  # the model alone (the loss graph is appended after export)
            return out
        losses = self.loss_fn(out, *args[self.n_inputs:])
        return (losses.mean(), out, losses) if self.each else (losses, out)


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _strip_prefix(model):
    """Initializer names as in model.named_parameters() (the export wrapper adds 'model.')."""
    rename = {t.name: t.name[len(PREFIX):] for t in model.graph.initializer if t.name.startswith(PREFIX)}
    for t in model.graph.initializer:
        t.name = rename.get(t.name, t.name)
    for node in model.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]


def _export_onnx(wrapper, args, names, outputs=("loss", "output")):
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = tuple({0: batch} for _ in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=18, optimize=False,
                                    dynamic_shapes=(dynamic,), input_names=names, output_names=list(outputs),
                                    verbose=False)
    model = program.model_proto
    _strip_prefix(model)
    for value in model.graph.input:
        dim = value.type.tensor_type.shape.dim
        if dim and dim[0].HasField("dim_value"):
            raise EdgezoError(f"export fixed the batch dimension of input {value.name!r}; "
                              "give example inputs with a batch of at least 2")
    return model


def export_module(model, example_inputs, example_targets, loss, out_dir, trainable=None,
                  formats=("onnx",), select=None):
    """Export `model` with `loss` ("mse", "cross_entropy" or a callable(output, *targets) -> scalar).

    `trainable`: parameter names to train (default: every parameter with requires_grad); or `select`, an
    exporters.config.Selection made on the exported graph as export-onnx makes it (one selection code). Writes
    manifest.json, params.npy, loss.onnx (flat params as one input), inference.onnx and reference.pt2.
    """
    loss_fn = LOSSES.get(loss, loss) if isinstance(loss, str) else loss
    if not callable(loss_fn):
        raise EdgezoError(f"loss must be one of {sorted(LOSSES)} or a callable, got {loss!r}")
    unknown = [f for f in formats if f not in ("onnx", "pte")]
    if unknown or "onnx" not in formats:
        raise EdgezoError(f"formats must include 'onnx' and may add 'pte', got {formats!r}")
    inputs, targets = _as_tuple(example_inputs), _as_tuple(example_targets)
    in_names = ["x"] if len(inputs) == 1 else [f"x{i}" for i in range(len(inputs))]
    tg_names = ["y"] if len(targets) == 1 else [f"y{i}" for i in range(len(targets))]
    model = model.eval()
    params = dict(model.named_parameters())
    if trainable is None:
        trainable = [k for k, p in params.items() if p.requires_grad]
    missing = [k for k in trainable if k not in params]
    if missing:
        raise EdgezoError(f"trainable names {missing} are not parameters of the model")

    # one loss definition: a built-in kind's loss graph is runtime/loss.py's, appended to the exported model; a
    # custom loss is traced with the model, per sample when it returns one value per sample, else the engine
    # does not apply (naive path)
    if isinstance(loss, str):
        check(len(targets) == 1, f"loss {loss!r} takes one target, got {len(targets)}")
        forward = _export_onnx(_WithLoss(model, None, len(inputs)), inputs, in_names, ("output",))
        full, each = append_loss(forward, loss, "output", None, target_name=tg_names[0])[0], True
    else:
        with torch.no_grad():
            sample = loss_fn(model(*inputs), *targets)
        each = sample.dim() == 1 and sample.shape[0] == inputs[0].shape[0]
        full = _export_onnx(_WithLoss(model, loss_fn, len(inputs), each), inputs + targets,
                            in_names + tg_names, ("loss", "output", "losses") if each else ("loss", "output"))
    check_model(full, "the exported loss graph")
    inference = Extractor(full).extract_model(in_names, ["output"])
    if select is not None and select.given():
        from .onnx_import import choose, prepare
        trainable = choose(prepare(inference)[0], **select.tensors())
    loss_model, entries, frozen, flat = flatten_trainable(full, trainable)
    with torch.no_grad():
        out = model(*inputs)
    kind = loss if isinstance(loss, str) else "custom"
    manifest = build_manifest(
        trainable=entries, frozen=frozen,
        inputs=[value_info(v) for v in full.graph.input if v.name in in_names],
        targets=[value_info(v) for v in full.graph.input if v.name in tg_names],
        outputs=[value_info(v) for v in inference.graph.output],
        loss={"kind": kind, "output": "loss", **({"per_sample": "losses"} if each else {}),
              "num_classes": int(out.shape[-1]) if kind == "cross_entropy" else None},
        files={"loss": "loss.onnx", "inference": "inference.onnx", "params": "params.npy",
               "reference": "reference.pt2", **({"pte": "model.pte"} if "pte" in formats else {})},
        pte_batch=int(inputs[0].shape[0]) if "pte" in formats else None,
        source={"kind": "torch", "model": type(model).__name__})

    def save_reference(path):
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        program = torch.export.export(model, inputs, dynamic_shapes=tuple({0: batch} for _ in inputs))
        torch.export.save(program, str(path))

    extra = [("reference.pt2", save_reference)]
    if "pte" in formats:
        from .executorch_export import write_pte
        extra.append(("model.pte", lambda path: write_pte(model, loss_fn, inputs, targets, manifest, path)))
    return write_artifact(out_dir, manifest, flat, {"loss.onnx": loss_model, "inference.onnx": inference}, extra)


def torch_losses(model, loss, inputs, targets):
    """The loss torch computes, for checking an artifact against its source."""
    loss_fn = LOSSES.get(loss, loss) if isinstance(loss, str) else loss
    with torch.no_grad():
        return float(loss_fn(model(*_as_tuple(inputs)), *_as_tuple(targets)))


def load_reference(artifact_dir, params=None):
    """The artifact's forward as a trainable torch module, optionally with `params` loaded: its reference.pt2,
    or for an imported ONNX model (none there) loss.onnx through the ONNX-to-torch interpreter."""
    from ..runtime.manifest import read
    artifact_dir = Path(artifact_dir)
    manifest = read(artifact_dir / "manifest.json")
    if "reference" in manifest["files"]:
        module = torch.export.load(str(artifact_dir / manifest["files"]["reference"])).module()
    else:
        from .onnx_torch import OnnxModule
        module = OnnxModule(artifact_dir)
    if params is not None:
        state = dict(module.named_parameters())
        for e in manifest["trainable"]:
            value = np.asarray(params[e["offset"]:e["offset"] + e["size"]]).reshape(e["shape"])
            state[e["name"]].data.copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return module, manifest
