"""Short training runs whose every bit is recorded: a refactor must leave them bit-identical.

    python tests/trajectories.py OUT.npz [LEGACY_DIR]   # record with the code on PYTHONPATH (the commit before
                                                        # a change); LEGACY_DIR: its run folders' checkpoints too

tests/test_trajectories.py replays them with this tree's code and compares params and losses exactly. The runs
use only run.train's keyword settings, which every version since the run folder accepts; each run trains on
artifacts exported by the code under test (the export is deterministic)."""
import sys
import tempfile
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
RUNS = {  # name: (model, settings)
    "mlp-cocd": ("mlp", dict(optimizer="cocd", lr=0.05, eps=0.01, budget=48, memory="0.25", gamma=0.9,
                             weight_decay=1e-3)),
    "mlp-cocd-one-sided": ("mlp", dict(optimizer="cocd", lr=0.05, eps=0.01, budget=32, one_sided=True)),
    "mlp-cocd-naive": ("mlp", dict(optimizer="cocd", lr=0.05, eps=0.01, budget=48, engine="naive")),
    "mlp-bccd": ("mlp", dict(optimizer="bccd", lr=0.05, eps=0.01, budget=64)),
    "mlp-mezo": ("mlp", dict(optimizer="mezo", lr=0.01, mu=1e-3, directions=4)),
    "mlp-spsa": ("mlp", dict(optimizer="spsa", lr=0.01, mu=1e-3, directions=2)),
    "mlp-zosgd": ("mlp", dict(optimizer="zosgd", lr=0.01, mu=1e-3, directions=2)),
    "mlp-cge": ("mlp", dict(optimizer="cge", lr=0.01, mu=1e-3, budget=100)),
    "cnn-cocd": ("cnn", dict(optimizer="cocd", lr=0.01, eps=0.01, budget=256, gamma=0.95)),
}


def datasets(folder):
    """The SARCOS test split (standardized, 256 rows) and 128 MNIST images as .npz files in folder."""
    from edgezo.runtime.data import load_idx_pair, load_sarcos
    x, y = load_sarcos(SHARED / "sarcos" / "sarcos_inv_test.mat")
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean(0)) / y.std(0)
    np.savez(folder / "sarcos.npz", x=x[:256].astype(np.float32), y=y[:256].astype(np.float32))
    images, labels = load_idx_pair(SHARED / "mnist" / "train-images-idx3-ubyte.gz")
    np.savez(folder / "mnist.npz", x=images[:128].reshape(-1, 1, 28, 28).astype(np.float32),
             y=labels[:128].astype(np.int64))
    return {"mlp": folder / "sarcos.npz", "cnn": folder / "mnist.npz"}


def artifacts(folder):
    import torch
    from edgezo.exporters import export_module
    from edgezo.exporters.models import mnist_cnn, sarcos_mlp
    torch.manual_seed(0)
    mlp = export_module(sarcos_mlp(), torch.randn(4, 21), torch.randn(4, 7), "mse", folder / "mlp")
    torch.manual_seed(0)
    cnn = export_module(mnist_cnn(), torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)), "cross_entropy",
                        folder / "cnn")
    return {"mlp": mlp, "cnn": cnn}


LEGACY = ("mlp-cocd", "mlp-mezo", "mlp-cge")  # runs whose checkpoint (at step 14 of 16) is kept as written


def run_all(folder, names=RUNS, checkpoint_every=None):
    """{name/params: final params, name/losses: per-epoch train losses} for each run."""
    from edgezo.runtime import run
    folder = Path(folder)
    data, arts = datasets(folder), artifacts(folder)
    out = {}
    for name in names:
        model, settings = RUNS[name]
        epochs, batch = (2, 32) if model == "mlp" else (1, 32)
        metrics = run.train(arts[model], data[model], folder / name, log=lambda *a: None, epochs=epochs, batch_size=batch,
                            seed=0, checkpoint_every=checkpoint_every if name in LEGACY else None, **settings)
        out[f"{name}/params"] = np.load(folder / name / "params.npy")
        out[f"{name}/losses"] = np.array([r["train_loss"] for r in metrics["history"]])
    return out


def keep_checkpoints(folder, legacy):
    """Each LEGACY run's config.json (its artifact and data paths as {artifact} and {data}) and checkpoint.npz."""
    import json
    import shutil
    for name in LEGACY:
        (legacy / name).mkdir(parents=True, exist_ok=True)
        config = json.loads((folder / name / "config.json").read_text())
        config.update(artifact="{artifact}", data="{data}", out="{out}")
        (legacy / name / "config.json").write_text(json.dumps(config, indent=1))
        shutil.copy(folder / name / "checkpoint.npz", legacy / name / "checkpoint.npz")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(sys.argv[1], **run_all(tmp, checkpoint_every=7 if len(sys.argv) > 2 else None))
        if len(sys.argv) > 2:
            keep_checkpoints(Path(tmp), Path(sys.argv[2]))
    print(f"wrote {sys.argv[1:]}")
