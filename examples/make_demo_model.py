"""Make the demo's "deployed" model: a small MobileNet-style digit classifier trained with backprop.

conv 3x3 stride 2 (1->16) + BN + ReLU, depthwise 3x3 (16) + BN + ReLU, pointwise 1x1 (16->32) + BN + ReLU,
depthwise 3x3 stride 2 (32) + BN + ReLU, pointwise 1x1 (32->32) + BN + ReLU, global average pool, linear 32->10.
Trained 2 epochs on MNIST (../shared/datasets/mnist) with SGD momentum, exported with torch's ONNX exporter
(opset 17, dynamic batch, BatchNorm kept as its own node) to edgezo/assets/digits_mobilenet.onnx, the file `edgezo demo` adapts.

Usage: python examples/make_demo_model.py [--epochs 2]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from edgezo.runtime.data import load_idx_pair  # noqa: E402

OUT = ROOT / "edgezo" / "assets" / "digits_mobilenet.onnx"


def block(c_in, c_out, kernel, stride=1, groups=1):
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU()]


def digits_mobilenet():
    return nn.Sequential(*block(1, 16, 3, 2), *block(16, 16, 3, groups=16), *block(16, 32, 1),
                         *block(32, 32, 3, 2, groups=32), *block(32, 32, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    x, y = load_idx_pair(ROOT / ".." / "shared" / "datasets" / "mnist" / "train-images-idx3-ubyte.gz")
    xt, yt = load_idx_pair(ROOT / ".." / "shared" / "datasets" / "mnist" / "t10k-images-idx3-ubyte.gz")
    torch.manual_seed(0)
    model = digits_mobilenet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    for epoch in range(args.epochs):
        model.train()
        for rows in torch.randperm(len(xs)).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[rows]), ys[rows]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean()
        print(f"epoch {epoch + 1}: test accuracy {100 * acc:.2f}%", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), str(OUT), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"], do_constant_folding=False,
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    print(f"wrote {OUT} ({sum(p.numel() for p in model.parameters())} params)")


if __name__ == "__main__":
    main()
