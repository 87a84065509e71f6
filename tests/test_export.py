import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgezo.exporters import export_module
from edgezo.exporters.models import mnist_cnn, sarcos_mlp
from edgezo.exporters.torch_export import torch_losses
from edgezo.runtime import EdgezoError, load_artifact
from edgezo.runtime.manifest import SCHEMA_PATH


@pytest.mark.parametrize("fixture, make, loss", [("mlp_artifact", sarcos_mlp, "mse"),
                                                 ("cnn_artifact", mnist_cnn, "cross_entropy")])
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_loss_graph_equals_torch(request, fixture, make, loss, batch):
    path = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    model = make().eval()
    artifact = load_artifact(path, device="cpu")
    params = artifact.initial_params()
    assert np.array_equal(params, torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy())
    g = torch.Generator().manual_seed(batch)
    if loss == "mse":
        x, y = torch.randn(batch, 21, generator=g), torch.randn(batch, 7, generator=g)
    else:
        x, y = torch.rand(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)
    ours = artifact.loss(params, x.numpy(), y.numpy())
    assert ours == pytest.approx(torch_losses(model, loss, x, y), rel=1e-5)
    # and at other weights: the flat vector really drives the graph
    shifted = params + np.float32(0.01) * np.random.default_rng(batch).standard_normal(params.size).astype(np.float32)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(shifted), model.parameters())
    assert artifact.loss(shifted, x.numpy(), y.numpy()) == pytest.approx(torch_losses(model, loss, x, y), rel=1e-5)


def test_artifact_files_and_manifest(mlp_artifact):
    manifest = json.loads((mlp_artifact / "manifest.json").read_text())
    assert manifest["num_params"] == 12039 and manifest["format_version"] == 2
    assert [t["name"] for t in manifest["trainable"]][:2] == ["0.weight", "0.bias"]
    assert manifest["inputs"] == [{"name": "x", "shape": ["batch", 21], "dtype": "float32"}]
    for name in ("loss.onnx", "inference.onnx", "params.npy", "reference.pt2"):
        assert (mlp_artifact / name).is_file()
    loss = onnx.load(mlp_artifact / "loss.onnx")
    assert loss.graph.input[0].name == "params"
    assert not {t["name"] for t in manifest["trainable"]} & {i.name for i in loss.graph.initializer}
    inference = ort.InferenceSession(str(mlp_artifact / "inference.onnx"))
    assert [i.name for i in inference.get_inputs()] == ["x"]
    assert json.loads(SCHEMA_PATH.read_text())["properties"]["format_version"]["enum"] == [1, 2]


def test_reference_program_trains_with_autograd(mlp_artifact):
    from edgezo.exporters.torch_export import load_reference
    module, _ = load_reference(mlp_artifact)
    out = module(torch.randn(3, 21))
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in module.parameters())


def copy_artifact(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("edit, needle", [
    (lambda p: (p / "loss.onnx").unlink(), "missing loss.onnx"),
    (lambda p: (p / "manifest.json").unlink(), "manifest.json: missing"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "manifest.json").write_text(json.dumps({**json.loads((p / "manifest.json").read_text()),
                                                            "num_params": "many"})), "manifest.num_params"),
    (lambda p: (p / "manifest.json").write_text(json.dumps({k: v for k, v in json.loads(
        (p / "manifest.json").read_text()).items() if k != "inputs"})), "missing the field 'inputs'"),
    (lambda p: (p / "loss.onnx").write_bytes(b"garbage"), "onnxruntime cannot load it"),
])
def test_broken_artifact_is_a_clear_error(mlp_artifact, tmp_path, edit, needle):
    path = copy_artifact(mlp_artifact, tmp_path / "a")
    edit(path)
    with pytest.raises(EdgezoError, match=needle):
        load_artifact(path)


def test_wrong_params_file(mlp_artifact, tmp_path):
    path = copy_artifact(mlp_artifact, tmp_path / "a")
    np.save(path / "params.npy", np.zeros(5, np.float32))
    with pytest.raises(EdgezoError, match="params.npy: holds float32 \\(5,\\)"):
        load_artifact(path).initial_params()


def test_export_refuses_nonempty_out(mlp_artifact):
    with pytest.raises(EdgezoError, match="not empty"):
        export_module(sarcos_mlp(), torch.randn(2, 21), torch.randn(2, 7), "mse", mlp_artifact)
