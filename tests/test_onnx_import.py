"""ONNX inference models (not only from torch) -> artifacts; write-back round trip."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from edgezo.exporters.onnx_graph import write_back
from edgezo.exporters.onnx_import import export_onnx
from edgezo.runtime import load_artifact

RNG = np.random.default_rng(0)


def init(name, *shape):
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), name)


def save(tmp_path, nodes, inits, x_shape, out_shape, name="m.onnx", opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    path = tmp_path / name
    onnx.save(model, path)
    return path


def gemm_mlp(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["out"], transB=1)]
    return save(tmp_path, nodes, [init("w1", 8, 4), init("b1", 8), init("w2", 3, 8), init("b2", 3)],
                ["N", 4], ["N", 3]), (4,), "mse"


def matmul_add(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("Tanh", ["a"], ["t"]), helper.make_node("MatMul", ["t", "w2"], ["m"]),
             helper.make_node("Add", ["m", "b2"], ["out"])]
    return save(tmp_path, nodes, [init("w", 4, 6), init("b", 6), init("w2", 6, 5), init("b2", 5)],
                ["N", 4], ["N", 5]), (4,), "cross_entropy"


def conv_bn_residual(tmp_path):
    bn = [init("bn_scale", 4), init("bn_bias", 4), init("bn_mean", 4),
          numpy_helper.from_array(np.abs(RNG.standard_normal(4)).astype(np.float32) + 0.5, "bn_var")]
    nodes = [helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "c2_w"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c2", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"]),
             helper.make_node("Add", ["bn", "r1"], ["res"]), helper.make_node("Relu", ["res"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"]), helper.make_node("Flatten", ["gap"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["out"], transB=1)]
    inits = [init("c1_w", 4, 2, 3, 3), init("c1_b", 4), init("c2_w", 4, 4, 3, 3), *bn, init("fc_w", 3, 4),
             init("fc_b", 3)]
    return save(tmp_path, nodes, inits, ["N", 2, 6, 6], ["N", 3]), (2, 6, 6), "cross_entropy"


def torch_model(tmp_path, dynamo):
    import torch
    from edgezo.exporters.models import sarcos_mlp
    torch.manual_seed(0)
    model = sarcos_mlp().eval()
    path = tmp_path / f"torch_{dynamo}.onnx"
    kwargs = dict(dynamic_shapes=({0: torch.export.Dim("batch")},)) if dynamo else \
        dict(dynamic_axes={"x": {0: "batch"}, "out": {0: "batch"}}, opset_version=17)
    torch.onnx.export(model, (torch.randn(3, 21),), str(path), dynamo=dynamo, input_names=["x"],
                      output_names=["out"], **kwargs)
    return path, (21,), "mse"


def numpy_loss(out, y, loss):
    if loss == "mse":
        return float(np.mean((out.astype(np.float64) - y) ** 2))
    z = out.astype(np.float64) - out.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


MODELS = {"gemm_transB": gemm_mlp, "matmul_add": matmul_add, "conv_bn_residual": conv_bn_residual,
          "torch_dynamo": lambda p: torch_model(p, True), "torch_torchscript": lambda p: torch_model(p, False)}


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("select", ["all", "last"])
def test_import_train_and_write_back(kind, select, tmp_path):
    path, in_shape, loss = MODELS[kind](tmp_path)
    selection = dict(trainable=["*"]) if select == "all" else dict(last_layers=1)
    if select == "all" and kind == "conv_bn_residual":
        selection = dict(trainable=["c*_w", "bn_scale", "bn_bias", "fc_*"])  # BN statistics stay frozen
    art = export_onnx(path, tmp_path / "art", loss, **selection)
    artifact = load_artifact(art, device="cpu")
    manifest = artifact.manifest
    assert manifest["source"]["kind"] == "onnx" and manifest["num_params"] > 0
    params = artifact.initial_params() + np.float32(0.05) * RNG.standard_normal(manifest["num_params"]).astype(
        np.float32)
    x = RNG.standard_normal((5, *in_shape)).astype(np.float32)
    out_dim = manifest["outputs"][0]["shape"][1]
    y = RNG.integers(0, out_dim, 5) if loss == "cross_entropy" else RNG.standard_normal((5, out_dim)).astype(
        np.float32)
    ours, ours_out = artifact.outputs(params, x, y)
    written = write_back(art / "inference.onnx", manifest["trainable"], params, tmp_path / "trained.onnx")
    session = ort.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert np.max(np.abs(ours_out - theirs)) <= 1e-5 * (1 + np.max(np.abs(theirs)))
    assert ours == pytest.approx(numpy_loss(theirs, y, loss), rel=1e-5)
    if select == "last":
        frozen = {t["name"] for t in manifest["frozen"]}
        assert frozen and len(manifest["trainable"]) <= 2


def test_cli_list_export_train_write_back(tmp_path):
    path, _, _ = gemm_mlp(tmp_path)
    proc = run_cli("export-onnx", path, "--list", check=True)
    assert "w1" in proc.stdout and "[8, 4]" in proc.stdout
    run_cli("export-onnx", path, "--trainable", "w2", "b2", "--loss", "mse", "--out", tmp_path / "art",
            block_torch=True, check=True)
    data = tmp_path / "d.npz"
    np.savez(data, x=RNG.standard_normal((64, 4)).astype(np.float32), y=RNG.standard_normal((64, 3)).astype(np.float32))
    run_cli("train", tmp_path / "art", "--data", data, "--budget", "9", "--batch-size", "16", "--epochs", "2",
            "--out", tmp_path / "run", block_torch=True, check=True)
    run_cli("write-back", tmp_path / "art", tmp_path / "run" / "params.npy", "--out", tmp_path / "final.onnx",
            block_torch=True, check=True)
    model = onnx.load(tmp_path / "final.onnx")
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["edgezo.optimizer"] == "cocd" and meta["edgezo.steps"] == "8" and "edgezo.version" in meta
    assert json.loads(meta["edgezo.settings"])["budget"] == 9
    trained = np.load(tmp_path / "run" / "params.npy")
    w2 = numpy_helper.to_array({t.name: t for t in model.graph.initializer}["w2"])
    assert np.array_equal(w2.reshape(-1), trained[:24])


@pytest.mark.parametrize("make, args, needle", [
    (lambda p: (p / "bad.onnx").write_bytes(b"\x00not onnx at all") and p / "bad.onnx",
     ["--trainable", "*", "--loss", "mse"], "not an ONNX model"),
    (lambda p: gemm_mlp(p)[0], ["--trainable", "nope*", "--loss", "mse"], "matches no tensor"),
    (lambda p: gemm_mlp(p)[0], ["--last-layers", "5", "--loss", "mse"], "only 2 such layers"),
    (lambda p: conv_bn_residual(p)[0], ["--trainable", "c1_w", "--loss", "cross_entropy", "--output", "gap"],
     "is not an output of the model"),
    (lambda p: save(p, [helper.make_node("Conv", ["x", "w"], ["out"])], [init("w", 2, 1, 3, 3)], ["N", 1, 5, 5],
                    ["N", 2, 3, 3]), ["--trainable", "w", "--loss", "cross_entropy"], "needs an output of shape"),
    (lambda p: save(p, [helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64),
                     helper.make_node("Gather", ["table", "xi"], ["g"]), helper.make_node("Add", ["g", "w"], ["out"])],
                    [numpy_helper.from_array(np.arange(6, dtype=np.int64).reshape(3, 2), "table"), init("w", 2)],
                    ["N"], ["N", 2]), ["--trainable", "table", "--loss", "mse"], "only float32 and float16 tensors"),
])
def test_bad_import_inputs(tmp_path, make, args, needle):
    path = make(tmp_path)
    proc = run_cli("export-onnx", path, *args, "--out", tmp_path / "art")
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
        proc.stderr
    assert not (tmp_path / "art").exists()
