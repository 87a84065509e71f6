"""One loss definition (manifest format 2): loss.onnx outputs the per-sample losses, the loss is their mean, and
the engine reads the graph's definition (a custom per-sample torch loss gets the engine); format 1 still loads."""
import json
import shutil

import numpy as np
import onnxruntime as ort
import torch

from edgezo.exporters import export_module
from edgezo.exporters.models import sarcos_mlp
from edgezo.runtime import load_artifact
from test_engine import assert_paths_taken, check_step, probes


def graph_losses(art, x, y):
    session = ort.InferenceSession(str(art / "loss.onnx"))
    params = np.load(art / "params.npy")
    feed = {"params": params, **{i.name: v for i, v in zip(session.get_inputs()[1:], (x, y))}}
    return session.run(["loss", "losses"], feed)


def test_loss_graphs_carry_per_sample_losses(mlp_artifact, tmp_path):
    from test_onnx_import import conv_bn_residual
    from edgezo.exporters.onnx_import import export_onnx
    rng = np.random.default_rng(0)
    m = json.loads((mlp_artifact / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["loss"]["per_sample"] == "losses"
    loss, losses = graph_losses(mlp_artifact, rng.standard_normal((5, 21)).astype(np.float32),
                                rng.standard_normal((5, 7)).astype(np.float32))
    assert losses.shape == (5,) and np.isclose(losses.mean(), loss, rtol=1e-6)
    path, _, _ = conv_bn_residual(tmp_path)
    for kind, y in (("cross_entropy", np.array([0, 2, 1])), ("mse", rng.standard_normal((3, 3)).astype(np.float32))):
        art = export_onnx(path, tmp_path / kind, kind, trainable=["*"], log=lambda line: None)
        loss, losses = graph_losses(art, rng.standard_normal((3, 2, 6, 6)).astype(np.float32), y)
        assert losses.shape == (3,) and np.isclose(losses.mean(), loss, rtol=1e-6), kind


def huber_each(out, y):  # a custom loss, one value per sample
    return torch.nn.functional.huber_loss(out, y, reduction="none", delta=0.5).mean(dim=1)


def huber_mean(out, y):
    return torch.nn.functional.huber_loss(out, y, delta=0.5)


def test_custom_per_sample_loss_gets_the_engine(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(6, 21), torch.randn(6, 7)
    each = load_artifact(export_module(sarcos_mlp(), x, y, huber_each, tmp_path / "each"), device="cpu")
    assert each.manifest["loss"] == {"kind": "custom", "output": "loss", "per_sample": "losses", "num_classes": None}
    assert each.fast_engine() is not None, each.engine_note
    naive = load_artifact(tmp_path / "each", device="cpu", engine="naive")
    params = each.initial_params()
    evaluated = list(probes(each, 64, 1e-2, every=40))
    for probe in evaluated:
        check_step(each.losses(params, probe, x.numpy(), y.numpy()), naive.losses(params, probe, x.numpy(), y.numpy()),
                   1e-2, 64)
    assert_paths_taken(each.paths_taken(), each.tensor_paths(), each.manifest, evaluated)
    mean = load_artifact(export_module(sarcos_mlp(), x, y, huber_mean, tmp_path / "mean"), device="cpu")
    assert "per_sample" not in mean.manifest["loss"] and mean.fast_engine() is None
    assert "per-sample" in mean.engine_note and set(mean.tensor_paths().values()) == {"naive"}


def test_format_1_artifacts_still_load_and_train(mlp_artifact, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(mlp_artifact, old)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 1
    del m["loss"]["per_sample"]
    (old / "manifest.json").write_text(json.dumps(m))
    fast, new = load_artifact(old, device="cpu"), load_artifact(mlp_artifact, device="cpu")
    x, y = np.random.default_rng(1).standard_normal((8, 21)).astype(np.float32), np.zeros((8, 7), np.float32)
    params = fast.initial_params()
    probe = next(probes(fast, 64, 1e-2))
    assert np.allclose(fast.losses(params, probe, x, y), new.losses(params, probe, x, y), rtol=1e-6)
