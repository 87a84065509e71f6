"""Replay every golden CoCD trajectory of the authors' reference implementation."""
import json
from pathlib import Path

import numpy as np
import pytest

from edgezo.runtime.optim import CoCD, CoordinateProbe, perturbed

GOLDEN = Path(__file__).resolve().parents[1] / ".." / "shared" / "golden" / "cocd"
FILES = sorted(GOLDEN.glob("*.npz"))


def mlp_loss(x, layers, X, Y):
    h, offset = X, 0
    for i, (n_in, n_out) in enumerate(zip(layers[:-1], layers[1:])):
        W = x[offset:offset + n_in * n_out].reshape(n_out, n_in)
        offset += n_in * n_out
        b = x[offset:offset + n_out]
        offset += n_out
        h = h @ W.T + b
        if i < len(layers) - 2:
            h = np.maximum(h, 0)
    return np.mean((h - Y) ** 2)


def objective(data, config):
    if config["objective"] == "quadratic":
        A, b = data["A"], data["b"]
        return lambda x, t: 0.5 * x @ A @ x - b @ x
    return lambda x, t: mlp_loss(x, data["layers"], data["X"][t], data["Y"][t])


def test_golden_files_present():
    assert len(FILES) == 7, f"expected the 7 golden files in {GOLDEN}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_golden_trajectory(path):
    data = np.load(path)
    config = json.loads(str(data["config"]))
    f = objective(data, config)
    theta = data["theta"]
    x = theta[0].copy()
    opt = CoCD(x, lr=config["lr"], eps=config["eps"], budget=config["budget"], memory=config.get("memory"),
               gamma=config["gamma"], weight_decay=config.get("weight_decay", 0.0),
               central=config.get("central", True),
               init_buffer=data["init_buffer"] if "init_grad" in config else None)
    tol = 1e-6 if config["eps"] <= 1e-5 else 1e-8
    for t in range(config["steps"]):
        assert f(x, t) == pytest.approx(data["loss"][t], rel=1e-9, abs=1e-12)
        probe = opt.ask()
        assert isinstance(probe, CoordinateProbe)
        opt.tell([f(perturbed(x, probe, p), t) for p in range(len(probe))])
        for ours, golden in ((x, theta[t + 1]), (opt.buffer, data["buffer"][t])):
            err = np.max(np.abs(ours - golden))
            assert err <= tol * (1 + np.max(np.abs(golden))), f"step {t}: error {err:.3e}"
