"""Files from other tools that regressed: a Paddle-style input [-1, 3, -1, -1] keeps its batch axis 0; a model
that needs long sequences (a reflection pad of 64, as an STFT front end) exports, the smoke test saying the size
it guessed or using --sample-data; onnxruntime's own log lines never reach the terminal; write-back of an .npz
is one line, exit 2."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli

RNG = np.random.default_rng(0)


def init(name, *shape):
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.1).astype(np.float32), name)


def save(path, nodes, inputs, outputs, inits):
    model = helper.make_model(helper.make_graph(nodes, "m", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def paddle_like(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "fw"], ["m"]), helper.make_node("Add", ["m", "fb"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=-1)]
    return save(tmp_path / "paddle.onnx", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])],
                [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [-1, 5])],
                [init("cw", 8, 3, 3, 3), init("cb", 8), init("fw", 8, 5), init("fb", 5)])


def reflect_padded(tmp_path, pad=64):
    nodes = [helper.make_node("Pad", ["audio", "pads"], ["p"], mode="reflect"), helper.make_node("Mul", ["p", "p"], ["e"]),
             helper.make_node("ReduceMean", ["e"], ["energy"], axes=[1], keepdims=1),
             helper.make_node("MatMul", ["energy", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["speech"], axis=-1)]
    pads = numpy_helper.from_array(np.array([0, pad, 0, pad], np.int64), "pads")
    return save(tmp_path / f"vad{pad}.onnx", nodes, [helper.make_tensor_value_info("audio", TensorProto.FLOAT,
                                                                                  ["batch", "samples"])],
                [helper.make_tensor_value_info("speech", TensorProto.FLOAT, ["batch", 2])],
                [init("w", 1, 2), init("b", 2), pads])


def test_paddle_minus_one_dims_keep_batch_axis_0(tmp_path):
    np.savez(tmp_path / "d.npz", x=RNG.standard_normal((16, 3, 12, 20)).astype(np.float32), y=RNG.integers(0, 5, 16))
    run_cli("export-onnx", paddle_like(tmp_path), "--last-layers", "1", "--out", tmp_path / "art", check=True)
    import json
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["inputs"][0]["shape"][:2] == ["batch", 3]
    run_cli("train", tmp_path / "art", "--data", tmp_path / "d.npz", "--budget", "9", "--batch-size", "8", "--out",
            tmp_path / "run", block_torch=True, check=True)


def test_long_sequence_model_exports_saying_the_size_it_guessed(tmp_path):
    model = reflect_padded(tmp_path)
    result = run_cli("export-onnx", model, "--last-layers", "1", "--out", tmp_path / "a", check=True)
    assert "dynamic non-batch dimensions given size 512 (8 did not run" in result.stdout
    assert "pre-pad (64) exceeds" in result.stdout and result.stderr == ""  # onnxruntime's own lines: none
    np.savez(tmp_path / "audio.npz", audio=RNG.standard_normal((8, 300)).astype(np.float32), y=RNG.integers(0, 2, 8))
    result = run_cli("export-onnx", model, "--last-layers", "1", "--sample-data", tmp_path / "audio.npz", "--out",
                     tmp_path / "b", check=True)
    assert "smoke test" not in result.stdout
    run_cli("train", tmp_path / "b", "--data", tmp_path / "audio.npz", "--budget", "4", "--batch-size", "4", "--out",
            tmp_path / "run", check=True)


def test_a_graph_that_never_runs_is_one_line_without_onnxruntime_logs(tmp_path):
    result = run_cli("export-onnx", reflect_padded(tmp_path, pad=5000), "--last-layers", "1", "--out", tmp_path / "a")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "does not run on a batch of 2 (other dynamic sizes 8, 64, 512, 4096)" in result.stderr
    assert "\x1b[" not in result.stderr + result.stdout and not (tmp_path / "a").exists()


def test_write_back_refuses_an_npz_in_one_line(tmp_path):
    run_cli("export-onnx", paddle_like(tmp_path), "--last-layers", "1", "--out", tmp_path / "art", check=True)
    np.savez(tmp_path / "p.npz", params=np.zeros(45, np.float32))
    np.save(tmp_path / "short.npy", np.zeros(7, np.float32))
    for params, needle in (("p.npz", "an .npz archive (params), not a .npy array"), ("short.npy", "wants float32 (45,)")):
        result = run_cli("write-back", tmp_path / "art", tmp_path / params, "--out", tmp_path / "x.onnx")
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr
        assert not (tmp_path / "x.onnx").exists()
