"""`edgezo demo`: robot-arm inverse dynamics, trained forward-only through onnxruntime.

Data comes from a planar 7-link arm with point masses (exact rigid-body dynamics: mass matrix,
Coriolis/centrifugal and gravity terms, viscous friction), or from a user's sarcos_inv.mat. The
paper's SARCOS MLP is exported to ONNX, trained with CoCD and BCCD in torch-free subprocesses
(`edgezo train`), and with torch SGD (momentum 0.9) as the first-order reference.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

JOINTS = 7


def arm_torques(q, qd, qdd, lengths, masses, friction, g=9.81):
    """Joint torques of a planar serial arm with point masses at the link tips (rows are samples)."""
    phi, phid, phidd = np.cumsum(q, 1), np.cumsum(qd, 1), np.cumsum(qdd, 1)  # absolute link angles
    outer = np.cumsum(masses[::-1])[::-1]                # mass at or beyond link i
    mass_ij = outer[np.maximum.outer(np.arange(JOINTS), np.arange(JOINTS))]
    ll = np.outer(lengths, lengths) * mass_ij
    diff = phi[:, :, None] - phi[:, None, :]
    tau_abs = (np.einsum("ij,nij,nj->ni", ll, np.cos(diff), phidd)
               + np.einsum("ij,nij,nj->ni", ll, np.sin(diff), phid ** 2)
               + g * lengths * outer * np.cos(phi))
    return np.cumsum(tau_abs[:, ::-1], 1)[:, ::-1] + friction * qd   # joint i drives links i..7


def arm_dataset(n, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.linspace(0.4, 0.1, JOINTS)
    masses = np.linspace(3.0, 0.5, JOINTS)
    q = rng.normal(0, 0.5, (n, JOINTS))      # around a nominal pose, as on a recorded trajectory
    qd = rng.normal(0, 0.5, (n, JOINTS))
    qdd = rng.normal(0, 1.0, (n, JOINTS))
    tau = arm_torques(q, qd, qdd, lengths, masses, friction=0.3)
    return np.concatenate([q, qd, qdd], 1).astype(np.float32), tau.astype(np.float32)


def standardize(train, val):
    mean, std = train.mean(0), train.std(0) + 1e-8
    return (train - mean) / std, (val - mean) / std


def make_data(out, sarcos=None, n=10000):
    if sarcos:
        from .runtime.data import load_sarcos
        x, y = load_sarcos(sarcos)
        source = str(sarcos)
    else:
        x, y = arm_dataset(n)
        source = "built-in planar 7-link arm model"
    order = np.random.default_rng(1).permutation(len(x))
    n_val = len(x) // 5
    tr, va = order[n_val:], order[:n_val]
    xt, xv = standardize(x[tr], x[va])
    yt, yv = standardize(y[tr], y[va])
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "train.npz", x=xt, y=yt)
    np.savez(out / "val.npz", x=xv, y=yv)
    return source, len(tr), len(va)


METHODS = {  # name: edgezo arguments (the paper's SARCOS B and gamma; lr and eps tuned for standardized data)
    "cocd": ["train", "--optimizer", "cocd", "--lr", "3e-3", "--eps", "0.1", "--budget", "64",
             "--gamma", "1.0", "--weight-decay", "1e-4"],
    "bccd": ["train", "--optimizer", "bccd", "--lr", "3e-3", "--eps", "0.1", "--budget", "64",
             "--weight-decay", "1e-4"],
    "torch-sgd": ["train-torch", "--optimizer", "momentum", "--lr", "1e-2", "--weight-decay", "1e-4"],
}


def run_method(name, extra, artifact, data_dir, out, epochs):
    cmd = [sys.executable, "-m", "edgezo.cli", *extra, str(artifact), "--data", str(data_dir / "train.npz"),
           "--val-data", str(data_dir / "val.npz"), "--batch-size", "64", "--epochs", str(epochs),
           "--out", str(out / name)]
    print(f"\n== {name}: edgezo {' '.join(extra)}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / name / "metrics.json").read_text())


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in results.items():
        ax.plot([r["epoch"] for r in m["history"]], [r["val_loss"] for r in m["history"]], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MSE (standardized torques)")
    ax.set_yscale("log")
    ax.set_title("Robot-arm inverse dynamics, MLP 21-64-64-64-32-7")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(args):
    from .exporters.models import sarcos_mlp
    from .exporters.torch_export import export_module
    import torch
    start = time.perf_counter()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    source, n_train, n_val = make_data(out / "data", args.sarcos)
    print(f"data: {source}, {n_train} train / {n_val} validation rows (standardized)")
    torch.manual_seed(0)
    export_module(sarcos_mlp(), torch.zeros(2, 21), torch.zeros(2, 7), "mse", out / "artifact")
    print(f"exported the SARCOS MLP (12,039 params) to {out / 'artifact'}")
    results = {name: run_method(name, extra, out / "artifact", out / "data", out, args.epochs)
               for name, extra in METHODS.items()}
    plot(results, out / "loss_curves.png")
    rows = []
    print(f"\n{'method':<10} {'final val MSE':>14} {'s/epoch':>9} {'peak RSS MiB':>13}  torch imported")
    for name, m in results.items():
        per_epoch = float(np.mean([r["seconds"] for r in m["history"]]))
        row = {"method": name, "val_loss": m["history"][-1]["val_loss"], "seconds_per_epoch": per_epoch,
               "peak_rss_mb": m["peak_rss_mb"], "torch_imported": m["torch_imported"]}
        rows.append(row)
        print(f"{name:<10} {row['val_loss']:>14.4f} {per_epoch:>9.2f} {row['peak_rss_mb']:>13.1f}  "
              f"{row['torch_imported']}")
    summary = {"data": source, "epochs": args.epochs, "rows": rows, "seconds": time.perf_counter() - start}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    print(f"\nloss curves: {out / 'loss_curves.png'}; trained model: {out / 'cocd' / 'trained.onnx'}; "
          f"summary: {out / 'demo.json'} ({summary['seconds']:.0f} s)")
