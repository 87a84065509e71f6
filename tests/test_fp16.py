"""fp16 models from onnxruntime's converter (with and without keep_io_types): the converter's out-of-order
nodes are sorted, fp16 weights train as float32 values cast to fp16 in the loss graph (training sees what
deploys), write-back keeps fp16, faster paths equal naive within fp16's rounding."""
from collections import Counter

import numpy as np
import onnx
import pytest

from conftest import assert_fast_equals_naive, run_cli
from edgezo.exporters.onnx_import import export_onnx
from edgezo.runtime import load_artifact
from edgezo.runtime.optim import CoCD

MODEL = __import__("pathlib").Path(__file__).resolve().parents[1] / "edgezo" / "assets" / "digits_mobilenet.onnx"


@pytest.fixture(scope="module", params=[True, False], ids=["keep_io_types", "fp16_io"])
def fp16(request, tmp_path_factory):
    from onnxruntime.transformers.float16 import convert_float_to_float16
    folder = tmp_path_factory.mktemp("fp16")
    path = folder / "model.onnx"
    onnx.save(convert_float_to_float16(onnx.load(MODEL), keep_io_types=request.param), path)
    return path, request.param


def test_fp16_trains_and_writes_back_in_fp16(fp16, tmp_path):
    path, keep = fp16
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", image=rng.random((64, 1, 28, 28), dtype=np.float32), y=rng.integers(0, 10, 64))
    run_cli("export-onnx", path, "--last-layers", "1", "--loss", "cross_entropy", "--out", tmp_path / "art", check=True)
    run_cli("train", tmp_path / "art", "--data", tmp_path / "d.npz", "--budget", "40", "--lr", "0.05",
            "--batch-size", "32", "--out", tmp_path / "run", block_torch=True, check=True)
    source, trained = onnx.load(path), onnx.load(tmp_path / "run" / "trained.onnx")
    kinds = {t.name: t.data_type for t in trained.graph.initializer}
    assert kinds["17.weight"] == kinds["17.bias"] == onnx.TensorProto.FLOAT16
    assert Counter(n.op_type for n in trained.graph.node) == Counter(n.op_type for n in source.graph.node)
    before = onnx.numpy_helper.to_array(next(t for t in source.graph.initializer if t.name == "17.weight"))
    after = onnx.numpy_helper.to_array(next(t for t in trained.graph.initializer if t.name == "17.weight"))
    assert not np.array_equal(before, after)
    import onnxruntime as ort
    session = ort.InferenceSession(str(tmp_path / "run" / "trained.onnx"), providers=["CPUExecutionProvider"])
    x = np.zeros((2, 1, 28, 28), np.float32 if keep else np.float16)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (2, 10)


def test_fp16_faster_paths_equal_naive_within_fp16_rounding(fp16, tmp_path):
    path, keep = fp16
    art = export_onnx(path, tmp_path / "art", "cross_entropy", last_layers=1, log=lambda line: None)
    fast, naive = load_artifact(art, "cpu"), load_artifact(art, "cpu", engine="naive")
    rng = np.random.default_rng(1)
    x, y = rng.random((16, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 16)
    # fp16 activations: 2^-10 relative rounding per op; the losses agree to 1e-3 relative
    assert_fast_equals_naive(fast, naive, fast.feeds(x, y), budget=40, steps=3, rtol=1e-3)
    # the engine builds on the model's own input type: float32 inputs (the head's weights behind a Cast: the copies
    # past it stacked, a float16 copy in the build's stacking check) or float16 inputs (the head's own kernels)
    assert fast.fast_engine() is not None, fast.engine_note
    assert set(fast.paths_taken()) == ({"stacked"} if keep else {"engine"}), fast.paths_taken()


def test_torch_half_export_trains_and_writes_back_in_fp16(tmp_path):
    """torch's model.half() export (fp16 inputs, weights and outputs) imports like the converter's files."""
    import torch
    from deployed import build
    model, shape = build("mobilenetv3_small", side=32)
    torch.onnx.export(model.half(), (torch.zeros(2, *shape, dtype=torch.float16),), str(tmp_path / "half.onnx"),
                      dynamo=False, opset_version=17, do_constant_folding=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    art = export_onnx(tmp_path / "half.onnx", tmp_path / "art", "cross_entropy", last_layers=1, log=lambda line: None)
    rng = np.random.default_rng(0)
    x, y = rng.random((32, *shape), dtype=np.float32).astype(np.float16), rng.integers(0, 10, 32)
    np.savez(tmp_path / "d.npz", x=x, target=y)
    run_cli("train", art, "--data", tmp_path / "d.npz", "--budget", "40", "--lr", "0.05", "--batch-size", "16",
            "--out", tmp_path / "run", block_torch=True, check=True)
    trained = onnx.load(tmp_path / "run" / "trained.onnx")
    kinds = {t.name: t.data_type for t in trained.graph.initializer}
    assert kinds["head.weight"] == kinds["head.bias"] == onnx.TensorProto.FLOAT16
    fast, naive = load_artifact(art, "cpu"), load_artifact(art, "cpu", engine="naive")
    feed = fast.feeds(x[:16], y[:16])
    params = fast.initial_params()
    probe = CoCD(params.copy(), lr=0.1, eps=0.05, budget=40).ask()
    a, b = fast.losses(params, probe, feed, feed), naive.naive_losses(params, probe, feed)
    assert np.allclose(a, b, rtol=1e-3, atol=0), np.max(np.abs(a - b) / np.abs(b))
