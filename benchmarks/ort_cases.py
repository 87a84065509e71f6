"""The cases of benchmarks/ort_training.py, made once (torch is needed here only), and the torch backprop reference.

  build CASE OUT:    OUT/source.onnx (the file both sides start from: pretrained backbone, fresh 10-way head),
                     OUT/model.pt (its torch weights, for the reference), OUT/art (the edgezo artifact of the case's
                     selection), the data as .npy/.npz.
  torch JOB RESULT:  backprop on the same tensors with the model's own torch code (not edgezo's ONNX interpreter),
                     for cases where ONNX Runtime cannot build the gradient graph; same loop and output as
                     ort_worker.py's train.

Cases: demo (edgezo demo's digit classifier with its fresh head, on Fashion-MNIST); the MobileNetV3-small-like
model (deployed.py, width 0.5) and the transformer (deployed.py, 28 tokens of 28 features: an image's rows), both
pretrained with backprop on MNIST (2 epochs, Adam) and given a fresh seeded 10-way head for Fashion-MNIST.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
CASES = {  # name: (architecture, export_onnx selection keywords, train rows, batch)
    "demo": ("demo", {"last_layers": 1}, 1024, 64),
    "mnv3_head": ("mobilenetv3_small", {"trainable": ["head.*"]}, 2048, 32),
    "mnv3_bn_biases": ("mobilenetv3_small", {"norms": True, "biases": True, "trainable": ["head.*"]}, 2048, 32),
    "transformer_block": ("transformer", {"trainable": ["blocks.1.*", "norm.*", "head.*"]}, 2048, 32),
}
TEST_ROWS = 1000
ARCH = {"mobilenetv3_small": dict(width=0.5, hidden=256), "transformer": dict(features=28, seq=28)}


def images(arch, x):
    """MNIST-format [N, 1, 28, 28] images as the architecture takes them."""
    if arch == "mobilenetv3_small":
        return np.ascontiguousarray(np.repeat(np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2))), 3, axis=1))
    if arch == "transformer":
        return np.ascontiguousarray(x[:, 0])
    return x


def torch_model(arch):
    import deployed
    model, _ = deployed.build(arch, **ARCH[arch])
    return model


def pretrain(arch, out, epochs=2):
    """Backprop on MNIST (Adam), then a fresh seeded 10-way head; source.onnx and model.pt."""
    import torch
    from paper_data import mnist_data
    from common import SHARED
    train, test = mnist_data(SHARED / "datasets" / "mnist")
    torch.set_num_threads(2)
    model = torch_model(arch).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = torch.from_numpy(images(arch, train["x"])), torch.from_numpy(train["y"].astype(np.int64))
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), 128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[order[i:i + 128]]), y[order[i:i + 128]]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(images(arch, test["x"][:2000])))
        print(f"  {arch} MNIST epoch {epoch + 1}: {100 * np.mean(logits.argmax(1).numpy() == test['y'][:2000]):.1f}%",
              flush=True)
        model.train()
    torch.manual_seed(1)
    model.head = torch.nn.Linear(model.head.in_features, 10)  # the new label set's head
    model.eval()
    torch.save(model.state_dict(), out / "model.pt")
    shape = images(arch, np.zeros((2, 1, 28, 28), np.float32)).shape
    torch.onnx.export(model, (torch.zeros(shape),), str(out / "source.onnx"), dynamo=False, opset_version=17,
                      do_constant_folding=False, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})


def build(case, out):
    from edgezo.adapt_demo import MODEL
    from edgezo.exporters.onnx_import import export_onnx
    from edgezo.runtime.data import load_idx_pair
    from common import SHARED
    arch, selection, rows, _ = CASES[case]
    out.mkdir(parents=True, exist_ok=True)
    if arch == "demo":  # the deployed file with the demo's fresh head is the source both sides start from
        export_onnx(MODEL, out / "head", "cross_entropy", num_classes=10, last_layers=1, seed=0, log=lambda s: None)
        (out / "source.onnx").write_bytes((out / "head" / "inference.onnx").read_bytes())
    else:  # one pretrained source per architecture, shared by its cases
        pretrained = out.parent / f"pretrained_{arch}"
        if not (pretrained / "source.onnx").exists():
            pretrained.mkdir(parents=True, exist_ok=True)
            pretrain(arch, pretrained)
        for f in ("source.onnx", "model.pt"):
            (out / f).write_bytes((pretrained / f).read_bytes())
    export_onnx(out / "source.onnx", out / "art", "cross_entropy", log=lambda s: None, **selection)
    folder = SHARED / "datasets" / "fashion-mnist"
    x, y = load_idx_pair(folder / "train-images-idx3-ubyte.gz")
    xt, yt = load_idx_pair(folder / "t10k-images-idx3-ubyte.gz")
    name = json.loads((out / "art" / "manifest.json").read_text())["inputs"][0]["name"]
    arrays = {"x": images(arch, x[:rows]), "y": y[:rows].astype(np.int64),
              "test_x": images(arch, xt[:TEST_ROWS]), "test_y": yt[:TEST_ROWS].astype(np.int64)}
    for k, v in arrays.items():
        np.save(out / f"{k}.npy", v)
    np.savez(out / "train.npz", **{name: arrays["x"], "target": arrays["y"]})
    np.savez(out / "test.npz", **{name: arrays["test_x"], "target": arrays["test_y"]})


def torch_train(job):
    """ort_worker.train with torch backprop: the same timed_loop, data, order, evaluations and output."""
    import torch
    from ort_worker import peak_rss_mb, rss_mb, timed_loop
    baseline = rss_mb()
    torch.set_num_threads(job.get("threads", 2))
    arrays = {k: np.load(v, mmap_mode="r" if k == "order" else None) for k, v in job["data"].items()}
    model = torch_model(job["arch"])
    model.load_state_dict(torch.load(job["model"]))
    model.eval()  # deployed BatchNorm: running statistics, as in the ONNX graph
    names = set(job["trainable"])
    params = [p for n, p in model.named_parameters() if n in names]
    missing = names - {n for n, _ in model.named_parameters()}
    if missing:
        raise SystemExit(f"the torch model has no parameters {sorted(missing)[:3]}")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = (torch.optim.AdamW(params, lr=job["lr"]) if job["optimizer"] == "adamw"
           else torch.optim.SGD(params, lr=job["lr"]))
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    tx, ty = torch.from_numpy(arrays["test_x"]), arrays["test_y"]

    def evaluate():
        with torch.no_grad():
            out = [model(tx[i:i + job["eval_batch"]]) for i in range(0, len(tx), job["eval_batch"])]
            logits = torch.cat(out)
            loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(ty)))
        return {"loss": loss, "accuracy": float(np.mean(logits.argmax(1).numpy() == ty))}

    def step(rows):
        rows = torch.from_numpy(rows)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
    evals = timed_loop(arrays["order"], step, evaluate, job["eval_every"], job["max_seconds"])
    return {"evals": evals, "peak_rss_mb": peak_rss_mb(), "rss_baseline_mb": baseline,
            "rss_rise_mb": peak_rss_mb() - baseline, "torch_imported": True}


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2], Path(sys.argv[3]))
    else:
        result = torch_train(json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps(result, indent=1))
