"""Checkpoints survive SIGKILL, resume is bit-identical, runs are deterministic, divergence is caught."""
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_cli
from edgezo.runtime import checkpoint

SMALL = ["--batch-size", "32", "--budget", "16", "--eps", "0.1", "--lr", "1e-3", "--seed", "3"]


def train_cmd(*args):
    return [sys.executable, "-m", "edgezo.cli", "train", *map(str, args)]


def test_sigkill_at_random_moments_then_resume_is_bit_identical(mlp_artifact, sarcos_npz, tmp_path):
    # naive evaluation and many epochs: 20 random kills must all land before the run could finish
    common = [mlp_artifact, "--data", sarcos_npz, "--epochs", "200", *SMALL, "--checkpoint-every", "25",
              "--engine", "naive"]
    run_cli("train", *common, "--out", tmp_path / "reference", check=True)
    reference = np.load(tmp_path / "reference" / "params.npy")

    run = tmp_path / "run"
    rng = np.random.default_rng(1234)
    kills = 0
    proc = subprocess.Popen(train_cmd(*common, "--out", run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    resumed = False
    while kills < 20 or not resumed:  # 20 kills, and the last restart a resume (not a start-over)
        time.sleep(rng.uniform(0.3, 1.0))
        deadline = time.monotonic() + 120  # past 20 kills, let the start-over reach a checkpoint to resume from
        while kills >= 20 and not (run / checkpoint.NAME).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is not None:  # finished before the kill: the run is too short for this test
            pytest.fail(f"training finished before kill {kills + 1}: {proc.stderr.read().decode()[-300:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        # killed while still starting (a loaded machine): no run folder yet
        leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")] if run.exists() else []
        assert not (run / "metrics.json").exists()
        if (run / checkpoint.NAME).exists():
            params, state, info = checkpoint.load(run)  # every checkpoint on disk loads
            assert params.shape == reference.shape and state["steps"] % 25 == 0
            proc = subprocess.Popen(train_cmd("--resume", run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            resumed = True
        else:  # killed before the first checkpoint: start over
            assert leftovers == [] or all(name.endswith(".tmp") for name in leftovers)
            shutil.rmtree(run, ignore_errors=True)
            resumed = False
            proc = subprocess.Popen(train_cmd(*common, "--out", run), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
    assert proc.wait() == 0, proc.stderr.read().decode()[-500:]
    assert np.array_equal(np.load(run / "params.npy"), reference)
    assert json.loads((run / "metrics.json").read_text())["resumed"] is True


def test_same_seed_same_params(mlp_artifact, sarcos_npz, tmp_path):
    for name in ("a", "b"):
        run_cli("train", mlp_artifact, "--data", sarcos_npz, "--epochs", "2", *SMALL, "--out", tmp_path / name,
                check=True)
    assert np.array_equal(np.load(tmp_path / "a" / "params.npy"), np.load(tmp_path / "b" / "params.npy"))


def test_resume_of_another_artifact_is_refused(mlp_artifact, cnn_artifact, sarcos_npz, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(mlp_artifact, "--data", sarcos_npz, "--epochs", "400", *SMALL,
                                      "--checkpoint-every", "5", "--out", run))
    deadline = time.time() + 30
    while not (run / checkpoint.NAME).exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    before = (run / checkpoint.NAME).read_bytes()
    result = run_cli("train", cnn_artifact, "--resume", run)
    assert result.returncode == 2 and "belongs to another artifact" in result.stderr
    assert (run / checkpoint.NAME).read_bytes() == before


def diverging_data(path, nan_row=None):
    """With nan_row: that row is finite but huge, so its batch's loss overflows to inf (NaN data is refused
    before training)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 21)).astype(np.float32)
    if nan_row is not None:
        x[nan_row] = 3e38
    np.savez(path, x=x, y=rng.standard_normal((256, 7)).astype(np.float32))
    return path


def test_halve_lr_recovers_from_a_too_large_lr(mlp_artifact, tmp_path):
    data = diverging_data(tmp_path / "d.npz")
    proc = run_cli("train", mlp_artifact, "--data", data, "--epochs", "2", "--batch-size", "32", "--budget", "64",
                   "--lr", "1e4", "--divergence-factor", "10", "--on-divergence", "halve-lr", "--out",
                   tmp_path / "run", check=True)
    assert "rolled back to the last good state, lr halved" in proc.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["divergence_events"] >= 1 and metrics["settings"]["lr"] < 1e4
    assert np.all(np.isfinite(np.load(tmp_path / "run" / "params.npy")))


def test_stop_on_non_finite_loss(mlp_artifact, tmp_path):
    data = diverging_data(tmp_path / "d.npz", nan_row=5)
    proc = run_cli("train", mlp_artifact, "--data", data, "--epochs", "1", "--batch-size", "32", "--budget", "8",
                   "--on-divergence", "stop", "--out", tmp_path / "run")
    assert proc.returncode == 2 and "diverged at step" in proc.stderr and "non-finite" in proc.stderr
    assert not (tmp_path / "run" / "params.npy").exists()


def test_rollback_skips_a_poisoned_batch(mlp_artifact, tmp_path):
    data = diverging_data(tmp_path / "d.npz", nan_row=5)
    proc = run_cli("train", mlp_artifact, "--data", data, "--epochs", "1", "--batch-size", "32", "--budget", "8",
                   "--out", tmp_path / "run", check=True)
    assert proc.stdout.count("rolled back") == 1
    assert np.all(np.isfinite(np.load(tmp_path / "run" / "params.npy")))
