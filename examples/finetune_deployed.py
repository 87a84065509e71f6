"""Fine-tune a deployed ONNX digit classifier forward-only, in a shifted domain (inverted digits).

1. Workstation: a digit classifier (MLP 784-128-10) is trained with torch SGD on MNIST
   (../shared/datasets/mnist) and exported as a plain inference ONNX file: the "deployed" model.
2. Device: the digits it sees are inverted (1 - pixel). edgezo turns the ONNX file into an artifact
   whose only trainable tensors are the last layer's (`export_onnx(..., last_layers=1)`), trains them
   with CoCD through onnxruntime in a torch-free subprocess (`edgezo train`), and writes the result
   back into the ONNX file (trained.onnx).
3. Reports accuracy on the inverted test set before and after, time and peak memory; writes
   runs/finetune/result.json.

Usage: python examples/finetune_deployed.py [--out runs/finetune] [--epochs 2]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / ".." / "shared" / "datasets" / "mnist"
sys.path.insert(0, str(ROOT))

from edgezo.exporters.onnx_import import export_onnx  # noqa: E402
from edgezo.runtime.data import load_idx_pair  # noqa: E402


def train_digit_classifier(x, y, epochs=2, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for epoch in range(epochs):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 128):
            rows = order[i:i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[rows]), yt[rows]).backward()
            opt.step()
    return model.eval()


def accuracy(onnx_path, x, y):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float(np.mean(np.argmax(logits, 1) == y))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "finetune"))
    parser.add_argument("--epochs", type=int, default=2, help="CoCD epochs over the shifted training rows")
    parser.add_argument("--rows", type=int, default=6000, help="shifted training rows seen on the device")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train = load_idx_pair(MNIST / "train-images-idx3-ubyte.gz")
    x_test, y_test = load_idx_pair(MNIST / "t10k-images-idx3-ubyte.gz")

    print("1. training the digit classifier with torch SGD on MNIST ...", flush=True)
    model = train_digit_classifier(x_train, y_train)
    deployed = out / "deployed.onnx"
    torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), str(deployed), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    shifted_test = 1.0 - x_test
    acc_clean, acc_before = accuracy(deployed, x_test, y_test), accuracy(deployed, shifted_test, y_test)
    print(f"   deployed model: {100 * acc_clean:.2f}% on MNIST test, {100 * acc_before:.2f}% on inverted digits")

    print("2. forward-only fine-tuning of the last layer on inverted digits (edgezo, no torch) ...", flush=True)
    artifact = out / "artifact"
    if artifact.exists():
        import shutil
        shutil.rmtree(artifact)
    export_onnx(deployed, artifact, "cross_entropy", last_layers=1)
    rng = np.random.default_rng(0)
    rows = rng.permutation(len(x_train))[:args.rows]
    np.savez(out / "shifted_train.npz", x=1.0 - x_train[rows], y=y_train[rows])
    run = out / "run"
    if run.exists():
        import shutil
        shutil.rmtree(run)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgezo.cli", "train", str(artifact), "--data", str(out / "shifted_train.npz"),
                    "--optimizer", "cocd", "--lr", "0.05", "--eps", "0.05", "--budget", "129", "--gamma", "0.9",
                    "--batch-size", "128", "--epochs", str(args.epochs), "--out", str(run)], check=True)
    seconds = time.perf_counter() - start
    metrics = json.loads((run / "metrics.json").read_text())
    acc_after = accuracy(run / "trained.onnx", shifted_test, y_test)
    result = {"accuracy_clean_before": acc_clean, "accuracy_shifted_before": acc_before,
              "accuracy_shifted_after": acc_after, "gain_points": 100 * (acc_after - acc_before),
              "trainable_params": json.loads((artifact / "manifest.json").read_text())["num_params"],
              "steps": metrics["steps"], "seconds": seconds, "peak_rss_mb": metrics["peak_rss_mb"],
              "torch_imported": metrics["torch_imported"]}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"3. inverted-digit accuracy {100 * acc_before:.2f}% -> {100 * acc_after:.2f}% "
          f"({result['gain_points']:+.1f} points) after {result['steps']} CoCD steps on "
          f"{result['trainable_params']} weights; {seconds:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MiB "
          f"(torch imported: {result['torch_imported']}); trained model {run / 'trained.onnx'}")
    return 0 if result["gain_points"] >= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
