"""The bad-input catalogue: each case is one line on stderr naming the cause, exit code 2, and
no half-written or changed file."""
import gzip
import json
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATASETS


def art(ctx, edit=None):
    """A private copy of the MLP artifact, optionally damaged by edit(path)."""
    path = ctx["tmp"] / "art"
    shutil.copytree(ctx["mlp"], path)
    if edit:
        edit(path)
    return path


def npz(ctx, **arrays):
    path = ctx["tmp"] / "data.npz"
    np.savez(path, **arrays)
    return path


def edit_manifest(**changes):
    def edit(path):
        manifest = json.loads((path / "manifest.json").read_text())
        for key, value in changes.items():
            if callable(value):
                value(manifest)
            else:
                manifest[key] = value
        (path / "manifest.json").write_text(json.dumps(manifest))
    return edit


def truncate(name):
    def edit(path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:len(data) // 2])
    return edit


def train(ctx, *extra, artifact=None, data=None):
    return ["train", artifact or ctx["mlp"], "--data", data or ctx["data"], "--out", ctx["tmp"] / "run",
            "--epochs", "1", "--batch-size", "64", *extra]


def bad_idx(ctx):
    folder = ctx["tmp"] / "idx"
    folder.mkdir()
    raw = gzip.open(DATASETS / "mnist" / "t10k-images-idx3-ubyte.gz").read()[:5000]
    (folder / "t-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    shutil.copy(DATASETS / "mnist" / "t10k-labels-idx1-ubyte.gz", folder / "t-labels-idx1-ubyte.gz")
    return folder / "t-images-idx3-ubyte.gz"


def finished_checkpoint_run(ctx, damage=False):
    from conftest import run_cli
    run = ctx["tmp"] / "run"
    run_cli(*train(ctx, "--checkpoint-every", "5"), check=True)
    (run / "metrics.json").unlink()
    if damage:
        truncate("checkpoint.npz")(run)
    return run


CASES = {
    "truncated loss.onnx": (lambda c: train(c, artifact=art(c, truncate("loss.onnx"))), "cannot load it"),
    "garbage loss.onnx": (lambda c: train(c, artifact=art(c, lambda p: (p / "loss.onnx").write_text("no"))),
                          "cannot load it"),
    "truncated params.npy": (lambda c: train(c, artifact=art(c, truncate("params.npy"))), "not a readable .npy"),
    "params.npy of the wrong size": (lambda c: train(c, artifact=art(
        c, lambda p: np.save(p / "params.npy", np.zeros(7, np.float32)))), "manifest.json wants float32 (12039,)"),
    "truncated manifest": (lambda c: train(c, artifact=art(c, truncate("manifest.json"))), "not valid JSON"),
    "manifest fails its schema": (lambda c: train(c, artifact=art(c, edit_manifest(loss={"kind": "hinge",
                                                                                          "output": "loss"}))),
                                  "manifest.loss.kind must be one of"),
    "manifest of a newer format": (lambda c: train(c, artifact=art(c, edit_manifest(format_version=3))),
                                   "format_version must be one of [1, 2]"),
    "manifest offsets do not add up": (lambda c: train(c, artifact=art(c, edit_manifest(
        trainable=lambda m: m["trainable"][1].update(offset=5)))), "expected offset 1344"),
    "manifest does not match its graph": (lambda c: train(c, artifact=art(c, lambda p: shutil.copy(
        c["cnn"] / "loss.onnx", p / "loss.onnx"))), "params input has shape [21578]"),
    "artifact folder missing a file": (lambda c: train(c, artifact=art(c, lambda p: (p / "inference.onnx").unlink())),
                                       "missing inference.onnx"),
    "artifact is a file": (lambda c: train(c, artifact=c["data"]), "is not a folder"),
    "data file missing": (lambda c: train(c, data=c["tmp"] / "nope.npz"), "no such file"),
    "data of unknown format": (lambda c: train(c, data=c["tmp"] / "x.txt") if (c["tmp"] / "x.txt").write_text("1")
                               else None, "unknown format"),
    "data of the wrong dtype": (lambda c: train(c, data=npz(c, x=np.array([["a"] * 21] * 70), y=np.zeros((70, 7)))),
                                "'x' must be numeric"),
    "data of the wrong shape": (lambda c: train(c, data=npz(c, x=np.zeros((70, 3)), y=np.zeros((70, 7)))),
                                "wants [N, 21]"),
    "inputs and targets of different lengths": (lambda c: train(c, data=npz(c, x=np.zeros((70, 21)),
                                                                            y=np.zeros((69, 7)))),
                                                "different numbers of rows"),
    "empty dataset": (lambda c: train(c, data=npz(c, x=np.zeros((0, 21)), y=np.zeros((0, 7)))), "dataset is empty"),
    "labels out of range": (lambda c: train(c, artifact=c["cnn"], data=npz(
        c, x=np.zeros((70, 1, 28, 28)), y=np.full(70, -1))), "label -1 of 'y' is outside [0, 10)"),
    "fractional labels": (lambda c: train(c, artifact=c["cnn"], data=npz(
        c, x=np.zeros((70, 1, 28, 28)), y=np.full(70, 0.5))), "must hold integer class labels"),
    "truncated IDX file": (lambda c: train(c, artifact=c["cnn"], data=bad_idx(c)), "IDX file is truncated"),
    "csv without target columns": (lambda c: train(c, data=c["tmp"] / "d.csv") if (c["tmp"] / "d.csv").write_text(
        "1,2\n") else None, "--target-columns"),
    "batch size above the dataset size": (lambda c: train(c, "--batch-size", "5000"), "--batch-size must be in"),
    "m > n": (lambda c: train(c, "--memory", "20000"), "--memory must be in [1, n=12039]"),
    "memory not a number": (lambda c: train(c, "--memory", "half"), "--memory must be a count or a fraction"),
    "B <= 0": (lambda c: train(c, "--budget", "0"), "budget must be an integer > 0"),
    "eps <= 0": (lambda c: train(c, "--eps", "0"), "eps must be > 0"),
    "gamma outside [0, 1]": (lambda c: train(c, "--gamma", "-0.5"), "gamma must be in [0, 1]"),
    "negative lr": (lambda c: train(c, "--lr", "-1"), "lr must be >= 0"),
    "zero epochs": (lambda c: train(c, "--epochs", "0"), "--epochs must be >= 1"),
    "validation fraction outside (0, 1)": (lambda c: train(c, "--val-fraction", "1.5"), "--val-fraction must be in"),
    "checkpoint every 0 steps": (lambda c: train(c, "--checkpoint-every", "0"), "--checkpoint-every must be >= 1"),
    "divergence factor <= 1": (lambda c: train(c, "--divergence-factor", "0.5"), "--divergence-factor must be > 1"),
    "output folder not empty": (lambda c: train(c) if (c["tmp"] / "run").mkdir() or (c["tmp"] / "run" / "f").touch()
                                is None else None, "exists and is not an empty folder"),
    "output parent is a regular file": (lambda c: ["train", c["mlp"], "--data", c["data"], "--out",
                                                   c["blocker"] / "run"], "is a file"),
    "resume a folder without checkpoint": (lambda c: ["train", "--resume", c["tmp"]], "cannot read config.json"),
    "resume from a damaged checkpoint": (lambda c: ["train", "--resume", finished_checkpoint_run(c, damage=True)],
                                         "damaged checkpoint"),
    "eval with params of another model": (lambda c: ["eval", c["mlp"], "--params", c["cnn"] / "params.npy",
                                                     "--data", c["data"]], "the artifact wants float32 (12039,)"),
}


@pytest.fixture
def ctx(mlp_artifact, cnn_artifact, sarcos_npz, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    return {"mlp": mlp_artifact, "cnn": cnn_artifact, "data": sarcos_npz, "tmp": tmp_path, "blocker": blocker}


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input(case, ctx):
    from conftest import run_cli
    make_args, needle = CASES[case]
    args = make_args(ctx)
    before = snapshot(ctx["tmp"])
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert snapshot(ctx["tmp"]) == before  # nothing written, nothing changed
    assert not (ctx["tmp"] / "run" / "metrics.json").exists()


def test_write_that_fails_midway(ctx):
    """RLIMIT_FSIZE makes the write of params.npy fail: one line, exit 2, no partial file left."""
    limit = 20_000  # config.json fits, params.npy (48 kB) does not
    code = "import sys; from edgezo.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *map(str, train(ctx))], capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "cannot write" in proc.stderr and "params.npy" in proc.stderr
    left = sorted(p.name for p in (ctx["tmp"] / "run").iterdir())
    assert left == ["config.json"]  # written whole before training; no params.npy, no temp file


def test_non_finite_rows_are_found_across_chunks():
    """The NaN/inf check runs a chunk of rows at a time (no whole-array mask on the peak): every bad row is found,
    in order, wherever the chunk boundaries fall."""
    from edgezo.runtime.data import _non_finite_rows
    value = np.zeros((37, 3, 5), np.float32)
    for row, v in ((0, np.nan), (14, np.inf), (15, -np.inf), (36, np.nan)):
        value[row, 1, 2] = v
    for chunk_bytes in (1, 15, 16, 100, 1 << 20):
        assert _non_finite_rows(value, chunk_bytes) == [0, 14, 15, 36]
