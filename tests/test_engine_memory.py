"""--engine-memory-mb is a cap that holds, measured in real `edgezo train` processes: on a MobileNetV3-small-like
model with its BatchNorm scales and shifts and every bias trainable (trainable tensors all through the network),
the engine's peak RSS rise beyond the naive path's stays under the cap (plus one cut session: the build checks
after each), and where the engine does not pay it runs naive and metrics.json says why."""
import json

import numpy as np
import pytest

import deployed  # benchmarks/deployed.py
from conftest import run_cli
from edgezo.exporters.onnx_import import export_onnx

ONE_SESSION_MB = 16  # the largest cut session of this model: the build may overshoot by one


@pytest.fixture(scope="module")
def biases_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("biases")
    deployed.export("mobilenetv3_small", folder / "m.onnx", width=0.5, side=32, hidden=256)
    art = export_onnx(folder / "m.onnx", folder / "art", "cross_entropy", norms=True, biases=True,
                      trainable=["head.*"], log=lambda line: None)
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", x=rng.standard_normal((64, 3, 32, 32)).astype(np.float32),
             target=rng.integers(0, 10, 64))
    return folder, art


def train(folder, art, name, *flags):
    run_cli("train", art, "--data", folder / "data.npz", "--batch-size", "32", "--steps", "40", "--optimizer", "cocd",
            "--budget", "64", "--lr", "0.01", *flags, "--out", folder / name, check=True)
    return json.loads((folder / name / "metrics.json").read_text())


@pytest.mark.alone
@pytest.mark.parametrize("cap", [32])
def test_engine_rise_beyond_naive_stays_under_the_cap(biases_case, cap):
    folder, art = biases_case
    naive = train(folder, art, f"naive{cap}", "--engine", "naive")
    capped = train(folder, art, f"cap{cap}", "--engine-memory-mb", str(cap))
    extra = capped["rss_rise_mb"] - naive["rss_rise_mb"]
    assert extra <= cap + ONE_SESSION_MB, (extra, capped["engine_note"])
    if capped["engine"] == "naive":  # it says why: the build went past the cap, or it was no faster
        assert "fast engine not used" in capped["engine_note"] and str(cap) in capped["engine_note"]
