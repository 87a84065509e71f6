import json

import numpy as np
import onnxruntime as ort
import pytest

from conftest import DATASETS, run_cli
from edgezo.runtime import load_artifact

TRAIN = ["--epochs", "1", "--batch-size", "64", "--budget", "32", "--lr", "1e-3", "--eps", "0.1"]


def test_train_without_torch_and_trained_onnx_matches(mlp_artifact, sarcos_npz, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", mlp_artifact, "--data", sarcos_npz, "--val-fraction", "0.25", "--out", out, *TRAIN,
                   block_torch=True, check=True)
    assert "epoch 1" in proc.stdout and "val loss" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["torch_imported"] is False and metrics["steps"] == 12
    assert metrics["settings"]["budget"] == 32 and metrics["history"][0]["val_loss"] > 0
    params = np.load(out / "params.npy")
    artifact = load_artifact(mlp_artifact, device="cpu")
    assert not np.array_equal(params, artifact.initial_params())
    x = np.load(sarcos_npz)["x"][:50]
    ours = artifact.outputs(params, x, np.zeros((50, 7), np.float32))[1]
    session = ort.InferenceSession(str(out / "trained.onnx"))
    theirs = session.run(None, {"x": x})[0]
    assert np.max(np.abs(ours - theirs)) <= 1e-5 * (1 + np.max(np.abs(ours)))
    meta = {p.key: p.value for p in __import__("onnx").load(out / "trained.onnx").metadata_props}
    assert meta["edgezo.optimizer"] == "cocd" and meta["edgezo.steps"] == "12"


def test_lean_memory_changes_no_result(mlp_artifact, sarcos_npz, tmp_path):
    for name, extra in (("plain", []), ("lean", ["--lean-memory"])):
        run_cli("train", mlp_artifact, "--data", sarcos_npz, "--out", tmp_path / name, *TRAIN, *extra, check=True)
    assert np.array_equal(np.load(tmp_path / "plain" / "params.npy"), np.load(tmp_path / "lean" / "params.npy"))


def test_eval_and_classifier_accuracy(cnn_artifact, tmp_path):
    images = DATASETS / "mnist" / "t10k-images-idx3-ubyte.gz"
    proc = run_cli("eval", cnn_artifact, "--params", cnn_artifact / "params.npy", "--data", images,
                   block_torch=True, check=True)
    result = json.loads(proc.stdout)
    assert 1.5 < result["loss"] < 3.5 and 0 <= result["accuracy"] <= 0.3  # an untrained 10-class model


@pytest.mark.parametrize("extra, needle", [
    (["--budget", "0"], "budget must be an integer > 0"),
    (["--eps", "-1"], "eps must be > 0"),
    (["--gamma", "1.5"], "gamma must be in [0, 1]"),
    (["--memory", "0"], "--memory must be in [1, n=12039]"),
    (["--memory", "99999"], "--memory must be in [1, n=12039]"),
    (["--memory", "1.5"], "--memory fraction must be in (0, 1]"),
    (["--batch-size", "5000"], "--batch-size must be in [1, 1024]"),
])
def test_bad_train_arguments_exit_2_and_write_nothing(mlp_artifact, sarcos_npz, tmp_path, extra, needle):
    out = tmp_path / "run"
    proc = run_cli("train", mlp_artifact, "--data", sarcos_npz, "--out", out, *TRAIN, *extra)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_data_exit_2(mlp_artifact, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((10, 20), np.float32), y=np.zeros((10, 7), np.float32))
    proc = run_cli("train", mlp_artifact, "--data", bad, "--out", tmp_path / "run")
    assert proc.returncode == 2 and "'x' has shape [10, 20], the artifact wants [N, 21]" in proc.stderr
    np.savez(bad, inputs=np.zeros((10, 21), np.float32))
    proc = run_cli("train", mlp_artifact, "--data", bad, "--out", tmp_path / "run")
    assert proc.returncode == 2 and "no array named 'x' (or x/X)" in proc.stderr
    proc = run_cli("train", tmp_path, "--data", bad, "--out", tmp_path / "run")
    assert proc.returncode == 2 and "manifest.json: missing" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_labels_out_of_range(cnn_artifact, tmp_path):
    bad = tmp_path / "labels.npz"
    np.savez(bad, x=np.zeros((4, 1, 28, 28), np.float32), y=np.array([0, 3, 10, 1]))
    proc = run_cli("eval", cnn_artifact, "--params", cnn_artifact / "params.npy", "--data", bad)
    assert proc.returncode == 2 and "label 10 of 'y' is outside [0, 10)" in proc.stderr
