"""First-order references in torch (SGD, SGD with momentum, Adam with autograd) on an artifact's own
reference.pt2, so no user code is needed. Used by the demo, the benchmarks and the profiler.
"""
import time

import numpy as np
import torch

from .exporters.torch_export import LOSSES, load_reference
from .runtime import data as data_mod
from .runtime.errors import EdgezoError
from .runtime.train import format_record

FIRST_ORDER = ("sgd", "momentum", "adam")


def make_torch_optimizer(name, parameters, lr, weight_decay=0.0):
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    raise EdgezoError(f"first-order optimizer must be one of {FIRST_ORDER}, got {name!r}")


def _tensors(manifest, batch):
    inputs = [torch.from_numpy(np.ascontiguousarray(batch[v["name"]])) for v in manifest["inputs"]]
    targets = [torch.from_numpy(np.ascontiguousarray(batch[v["name"]])) for v in manifest["targets"]]
    return inputs, targets


def evaluate_torch(module, manifest, loss_fn, data, batch_size=1024):
    n, total, correct = data_mod.num_rows(data), 0.0, 0
    with torch.no_grad():
        for rows in range(0, n, batch_size):
            inputs, targets = _tensors(manifest, data_mod.take(data, slice(rows, rows + batch_size)))
            out = module(*inputs)
            total += float(loss_fn(out, *targets)) * len(out)
            if manifest["loss"]["kind"] == "cross_entropy":
                correct += int((out.argmax(-1) == targets[0]).sum())
    result = {"loss": total / n}
    if manifest["loss"]["kind"] == "cross_entropy":
        result["accuracy"] = correct / n
    return result


def fit_torch(artifact_dir, optimizer, train_data, batch_size, epochs, lr, seed=0, val_data=None,
              weight_decay=0.0, log=print, threads=None):
    """Backprop training of the artifact's reference program; returns (history, trained flat params)."""
    if threads:
        torch.set_num_threads(threads)
    module, manifest = load_reference(artifact_dir)
    kind = manifest["loss"]["kind"]
    if kind not in LOSSES:
        raise EdgezoError(f"first-order reference needs a built-in loss, the artifact has {kind!r}")
    loss_fn = LOSSES[kind]
    named = dict(module.named_parameters())
    trainable = [named[e["name"]] for e in manifest["trainable"]]
    opt = make_torch_optimizer(optimizer, trainable, lr, weight_decay)
    n, history, steps = data_mod.num_rows(train_data), [], 0
    for epoch in range(epochs):
        start, losses = time.perf_counter(), []
        for batch in data_mod.batches(train_data, batch_size, data_mod.epoch_order(n, seed, epoch)):
            inputs, targets = _tensors(manifest, batch)
            opt.zero_grad()
            loss = loss_fn(module(*inputs), *targets)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps += 1
        record = {"epoch": epoch + 1, "steps": steps, "train_loss": float(np.mean(losses)),
                  "seconds": time.perf_counter() - start}
        if val_data is not None:
            record.update({f"val_{k}": v for k, v in evaluate_torch(module, manifest, loss_fn, val_data).items()})
        history.append(record)
        if log:
            log(format_record(record))
    flat = torch.cat([p.detach().reshape(-1) for p in trainable]).numpy().astype(np.float32)
    return history, flat
