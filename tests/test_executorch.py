"""ExecuTorch programs: export, losses equal onnxruntime's, training through the .pte."""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from edgezo.exporters import export_module
from edgezo.exporters.models import sarcos_mlp
from edgezo.runtime import EdgezoError, load_artifact
from edgezo.runtime.optim import CoCD


@pytest.fixture(scope="module")
def pte_artifact(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("pte") / "mlp"
    export_module(sarcos_mlp(), torch.randn(32, 21), torch.randn(32, 7), "mse", path, formats=("onnx", "pte"))
    return path


def test_executorch_losses_equal_onnxruntime(pte_artifact):
    et = load_artifact(pte_artifact, backend="executorch")
    ort_art = load_artifact(pte_artifact, backend="onnxruntime")
    assert json.loads((pte_artifact / "manifest.json").read_text())["pte_batch"] == 32
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 21)).astype(np.float32), rng.standard_normal((32, 7)).astype(np.float32)
    params = et.initial_params()
    opt = CoCD(params, lr=1e-3, eps=0.1, budget=40)
    probe = opt.ask()
    ours, theirs = et.losses(params, probe, x, y), ort_art.losses(params, probe, x, y)
    assert np.allclose(ours, theirs, rtol=1e-5, atol=0)


def test_train_with_executorch_backend(pte_artifact, sarcos_npz, tmp_path):
    out = tmp_path / "run"
    run_cli("train", pte_artifact, "--backend", "executorch", "--data", sarcos_npz, "--batch-size", "32",
            "--budget", "16", "--eps", "0.1", "--epochs", "1", "--val-fraction", "0.1", "--out", out, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == "executorch" and metrics["steps"] == 922 // 32  # 922 rows, last partial batch dropped


def test_wrong_batch_and_wrong_program(pte_artifact, tmp_path, sarcos_npz):
    proc = run_cli("train", pte_artifact, "--backend", "executorch", "--data", sarcos_npz, "--batch-size", "64",
                   "--out", tmp_path / "run")
    assert proc.returncode == 2 and "--batch-size must be 32" in proc.stderr
    other = tmp_path / "other"
    torch.manual_seed(2)
    export_module(torch.nn.Sequential(torch.nn.Linear(21, 7)), torch.randn(32, 21), torch.randn(32, 7), "mse",
                  other, formats=("onnx", "pte"))
    broken = tmp_path / "broken"
    shutil.copytree(pte_artifact, broken)
    shutil.copy(other / "model.pte", broken / "model.pte")
    with pytest.raises(EdgezoError, match="a program of another model"):
        load_artifact(broken, backend="executorch")


def test_truncated_pte_is_a_clear_error(pte_artifact, tmp_path):
    broken = tmp_path / "truncated"
    shutil.copytree(pte_artifact, broken)
    data = (broken / "model.pte").read_bytes()
    (broken / "model.pte").write_bytes(data[:len(data) // 3])
    proc = run_cli("train", broken, "--backend", "executorch", "--data", broken / "params.npy", "--out",
                   tmp_path / "run")
    assert proc.returncode == 2 and "ExecuTorch cannot load it" in proc.stderr, proc.stderr
    # ExecuTorch's own import prints library-loading notices to stderr; edgezo's error is one line
    assert len([line for line in proc.stderr.splitlines() if line.startswith("edgezo:")]) == 1
    assert not (tmp_path / "run").exists()
