"""The paper benchmarks' datasets from ../shared, as the benchmarks feed them: SARCOS standardized by its training
split, MNIST-format images in [0, 1] (or standardized), Fashion-MNIST padded to 3x32x32 for ResNet-20."""
import numpy as np

from common import SHARED
from edgezo.runtime import data as data_mod


def sarcos_data(path, seed=0):
    x, y = data_mod.load_sarcos(path)
    train, val = data_mod.split({"x": x, "y": y}, 0.2, seed)
    for key in ("x", "y"):
        mean, std = train[key].mean(0), train[key].std(0) + 1e-8
        train[key], val[key] = (train[key] - mean) / std, (val[key] - mean) / std
    return train, val


def mnist_data(folder, standardize=False):
    """Pixels in [0, 1]; with standardize, minus the training set's mean pixel over its std (torchvision's
    Normalize((0.1307,), (0.3081,)) for MNIST)."""
    x, y = data_mod.load_idx_pair(folder / "train-images-idx3-ubyte.gz")
    xt, yt = data_mod.load_idx_pair(folder / "t10k-images-idx3-ubyte.gz")
    if standardize:
        mean, std = float(x.mean()), float(x.std())
        x, xt = (x - mean) / std, (xt - mean) / std
    return {"x": x, "y": y}, {"x": xt, "y": yt}


def padded_fashion(limit=None):
    """Fashion-MNIST as 3x32x32 (zero-padded 2 px, grey copied to 3 channels) for ResNet-20."""
    train, test = mnist_data(SHARED / "datasets" / "fashion-mnist")
    out = []
    for d in (train, test):
        x = np.pad(d["x"], ((0, 0), (0, 0), (2, 2), (2, 2)))
        out.append({"x": np.ascontiguousarray(np.repeat(x, 3, axis=1)), "y": d["y"]})
    out[1] = data_mod.take(out[1], slice(0, limit))
    return out
