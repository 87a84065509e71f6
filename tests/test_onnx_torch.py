"""The ONNX-to-torch interpreter: first-order baselines (train-torch, profile) for imported models."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import run_cli
from edgezo.exporters.onnx_import import export_onnx
from edgezo.exporters.onnx_torch import OnnxModule
from edgezo.runtime import load_artifact
from test_wild_onnx import arr, layer_models, softmax_mlp, state_model


def scores_by_ort(art, params, feed):
    """The tensor the loss reads, by onnxruntime on loss.onnx."""
    import onnx
    from edgezo.runtime.engine.graph import cut
    from edgezo.runtime.loss import scores_name
    model = onnx.load(art.file("loss"))
    name = scores_name(art.manifest)
    inputs = [art.manifest["params_input"]] + art.input_names
    sub = cut(onnx.shape_inference.infer_shapes(model), inputs, [name])
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(feed, params=params))[0]


@pytest.mark.parametrize("make", ["softmax_constants_opset11", "conv_gemm_matmul", "state"])
def test_interpreter_matches_onnxruntime_and_has_gradients(tmp_path, make):
    if make == "softmax_constants_opset11":
        path, _ = softmax_mlp(tmp_path, 11)
        art_dir = export_onnx(path, tmp_path / "art", None, trainable=["*"], log=lambda line: None)
        feed = {"x": arr(6, 4)}
    elif make == "conv_gemm_matmul":
        art_dir = export_onnx(layer_models(tmp_path), tmp_path / "art", "mse", trainable=["*"], log=lambda line: None)
        feed = {"img": arr(6, 2, 4, 4)}
    else:
        path, _ = state_model(tmp_path)
        art_dir = export_onnx(path, tmp_path / "art", "mse", trainable=["w", "b"], fix_input=["sr=8000"],
                              log=lambda line: None)
        feed = {"x": arr(6, 4), "h": arr(6, 2, 3)}
    art = load_artifact(art_dir, "cpu")
    module = OnnxModule(art_dir)
    ours = module(*[torch.from_numpy(feed[n]) for n in art.input_names])
    theirs = scores_by_ort(art, art.initial_params(), feed)
    assert np.allclose(ours.detach().numpy(), theirs, atol=1e-5)
    ours.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in module.named_parameters())
    assert [n for n, _ in module.named_parameters()] == [e["name"] for e in art.manifest["trainable"]]


def test_train_torch_on_an_imported_model(tmp_path):
    path, _ = softmax_mlp(tmp_path, 11)
    run_cli("export-onnx", path, "--last-layers", "1", "--out", tmp_path / "art", check=True)
    np.savez(tmp_path / "d.npz", x=arr(128, 4, scale=1.0), y=np.random.default_rng(0).integers(0, 3, 128))
    proc = run_cli("train-torch", tmp_path / "art", "--data", tmp_path / "d.npz", "--optimizer", "adam", "--lr",
                   "0.05", "--epochs", "3", "--batch-size", "32", "--out", tmp_path / "run", check=True)
    import json
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"], proc.stdout
    assert (tmp_path / "run" / "trained.onnx").exists()


def test_an_op_the_interpreter_lacks_is_named(tmp_path):
    from onnx import TensorProto, helper
    from test_wild_onnx import save
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"]), helper.make_node("Selu", ["g"], ["out"])]
    path = save(tmp_path, nodes, {"w": arr(4, 2), "b": arr(2)}, [("x", TensorProto.FLOAT, ["N", 4])],
                [("out", TensorProto.FLOAT, ["N", 2])])
    art_dir = export_onnx(path, tmp_path / "art", "mse", trainable=["*"], log=lambda line: None)
    with pytest.raises(Exception, match="no op Selu"):
        OnnxModule(art_dir)
