"""int8 models in QDQ form, made here with onnxruntime.quantization.quantize_static from the deployed digit
classifier: per-channel symmetric int8 and per-tensor asymmetric uint8. --list names what is quantized; --scales,
--biases and --last-layers train; write-back keeps int8 (same ops, same dtypes, size within 5%) and the written
file computes what training computed; a bias follows its weight's scale (onnxruntime's QDQ fusion on and off
agree); faster paths equal naive within float32 rounding; unrepresentable values are one-line errors."""
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import DATASETS, assert_fast_equals_naive, run_cli
from edgezo.exporters.onnx_import import export_onnx
from edgezo.runtime import load_artifact
from edgezo.runtime.data import load_idx_pair
from edgezo.runtime.optim import CoCD

MODEL = __import__("pathlib").Path(__file__).resolve().parents[1] / "edgezo" / "assets" / "digits_mobilenet.onnx"
FORMS = {"per_channel_symmetric": dict(per_channel=True, weight="QInt8", activation="QInt8", symmetric=True),
         "per_tensor_asymmetric": dict(per_channel=False, weight="QUInt8", activation="QUInt8", symmetric=False),
         "qoperator": dict(per_channel=True, weight="QInt8", activation="QUInt8", symmetric=False, form="QOperator")}


def quantize(path, per_channel, weight, activation, symmetric, form="QDQ"):
    from edgezo.exporters.quantize import quantize_static_int8
    x, _ = load_idx_pair(DATASETS / "mnist" / "t10k-images-idx3-ubyte.gz")
    return quantize_static_int8(MODEL, path, [{"image": x[i:i + 32]} for i in range(0, 256, 32)], per_channel,
                                weight, activation, symmetric, form)


@pytest.fixture(scope="module", params=list(FORMS))
def qdq(request, tmp_path_factory):
    return quantize(tmp_path_factory.mktemp("int8") / f"{request.param}.onnx", **FORMS[request.param])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    x, y = load_idx_pair(DATASETS / "fashion-mnist" / "t10k-images-idx3-ubyte.gz")
    path = tmp_path_factory.mktemp("data") / "d.npz"
    np.savez(path, image=x[:256], target=y[:256].astype(np.int64))
    return path, x[:256], y[:256].astype(np.int64)


def session(path, optimize=False):
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 4
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cross_entropy(logits, y):
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


def test_list_shows_quantized_layers_as_such(qdq):
    out = run_cli("export-onnx", qdq, "--list", check=True).stdout
    assert "--scales trains" in out
    if qdq.name.startswith("qoperator"):
        assert "weight '17.weight_quantized' int8 [10, 32] of QGemm: scale '17.weight_scale' per-channel axis 0" in out
        assert "bias   '17.bias_quantized' int32 [10] of QGemm: read at input scale" in out
    else:
        symmetric = "per_channel" in qdq.name
        assert f"weight '17.weight_quantized' {'int8' if symmetric else 'uint8'} [10, 32] of Gemm" in out
        assert "bias   '17.bias_quantized' int32 [10] of Gemm" in out and "follows '17.weight_quantized''s scale" in out
        assert ("per-channel axis 0 (10 scales) symmetric" if symmetric else "per-tensor asymmetric") in out
    head = [line for line in out.splitlines() if line.startswith("/17/Gemm")]
    assert head and head[0].split()[2] == "330"  # the int8 head counts as the 330 weights it trains as


@pytest.mark.parametrize("selection", [["--scales", "--biases"], ["--last-layers", "1"], ["--lora", "2"],
                                       ["--num-classes", "10", "--last-layers", "1"]],
                         ids=["scales_biases", "head", "lora", "fresh_head"])
def test_write_back_keeps_int8_and_computes_what_training_computed(qdq, data, tmp_path, selection):
    path, x, y = data
    art = tmp_path / "art"
    run_cli("export-onnx", qdq, *selection, "--loss", "cross_entropy", "--out", art, check=True)
    run_cli("train", art, "--data", path, "--val-data", path, "--budget", "40", "--lr", "0.05", "--eps", "0.05",
            "--batch-size", "64", "--epochs", "2", "--out", tmp_path / "run", block_torch=True, check=True)
    trained_path = tmp_path / "run" / "trained.onnx"
    source, trained = onnx.load(qdq), onnx.load(trained_path)
    assert Counter(n.op_type for n in trained.graph.node) == Counter(n.op_type for n in source.graph.node)
    kinds = {t.name: (t.data_type, list(t.dims)) for t in trained.graph.initializer}
    assert kinds == {t.name: (t.data_type, list(t.dims)) for t in source.graph.initializer}
    ratio = trained_path.stat().st_size / qdq.stat().st_size
    assert ratio < 1.05 and (ratio > 0.95 or "--num-classes" in selection)  # a fresh head drops stale value_info
    changed = [t.name for t in trained.graph.initializer
               if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(
                   next(s for s in source.graph.initializer if s.name == t.name)))]
    fresh = "--num-classes" in selection  # a fresh head: its zero point is new too
    assert changed and all("scale" in n or "quantized" in n or n.endswith("bias") or (fresh and "zero_point" in n)
                           for n in changed), changed
    # the deployed int8 file's loss is the training graph's loss at the trained params (float32 rounding)
    art_loaded = load_artifact(art, "cpu")
    params = np.load(tmp_path / "run" / "params.npy")
    trained_loss = art_loaded.outputs(params, {"image": x}, {"target": y})[0]
    deployed = cross_entropy(session(trained_path).run(None, {"image": x})[0], y)
    assert abs(deployed - trained_loss) < 1e-5 * max(1.0, abs(trained_loss)), (deployed, trained_loss)


def test_a_bias_follows_its_weight_scale_so_fusion_on_and_off_agree(qdq, data, tmp_path):
    """onnxruntime's QDQ fusion (QLinearConv, QGemm) reads an int32 bias at input scale x weight scale. A weight
    scale changed alone rescales the bias in the fused graph only; edgezo's write-back re-quantizes the bias.
    (QOperator: the op itself reads the bias at that scale; write-back keeps the bias's float value.)"""
    _, x, y = data
    art = export_onnx(qdq, tmp_path / "art", "cross_entropy", scales=True, log=lambda line: None)
    manifest = load_artifact(art, "cpu").manifest
    entry = next(e for e in manifest["trainable"] if e["name"] == "17.weight_scale__log_factor")
    params = np.zeros(manifest["num_params"], np.float32)
    params[entry["offset"]:entry["offset"] + entry["size"]] = np.log(1.5)
    run_cli("write-back", art, _save(tmp_path / "p.npy", params), "--out", tmp_path / "edgezo.onnx", check=True)
    naive = onnx.load(qdq)  # the scale alone, as a tool unaware of the tie would write it
    scale = next(t for t in naive.graph.initializer if t.name == "17.weight_scale")
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.5), scale.name))
    onnx.save(naive, tmp_path / "naive.onnx")
    if qdq.name.startswith("qoperator"):
        tensors = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "edgezo.onnx").graph.initializer}
        before = {t.name: numpy_helper.to_array(t) for t in onnx.load(qdq).graph.initializer}
        x_scale = before["/16/Flatten_output_0_scale"]
        value = before["17.bias_quantized"] * x_scale * before["17.weight_scale"]
        now = tensors["17.bias_quantized"] * x_scale * tensors["17.weight_scale"]
        assert np.all(np.abs(now - value) <= 0.5 * x_scale * tensors["17.weight_scale"] * 1.0001)
        assert not np.array_equal(tensors["17.bias_quantized"], before["17.bias_quantized"])
        return
    losses = {name: [cross_entropy(session(tmp_path / name, optimize).run(None, {"image": x})[0], y)
                     for optimize in (False, True)] for name in ("edgezo.onnx", "naive.onnx")}
    assert abs(losses["edgezo.onnx"][0] - losses["edgezo.onnx"][1]) < 1e-6, losses
    assert abs(losses["naive.onnx"][0] - losses["naive.onnx"][1]) > 1e-3, losses


def test_activation_scales_train_as_factors_and_their_biases_follow(qdq, data, tmp_path):
    """--activation-scales (what calibration chose) train as log-factors; a QDQ bias read at a trained input scale
    is re-quantized with it, so onnxruntime's fusion on and off agree on the written-back file, which computes
    what training computed; the engine's losses equal naive's."""
    if qdq.name.startswith("qoperator"):
        pytest.skip("QOperator layers read their activation scales themselves: only the input's is a QuantizeLinear")
    _, x, y = data
    art = export_onnx(qdq, tmp_path / "art", "cross_entropy", activation_scales=True, log=lambda line: None)
    fast, naive = load_artifact(art, "cpu"), load_artifact(art, "cpu", engine="naive")
    assert_fast_equals_naive(fast, naive, fast.feeds(x[:32], y[:32]), budget=8, steps=2, rtol=1e-5)
    entry = next(e for e in fast.manifest["trainable"] if e["name"] == "/15/GlobalAveragePool_output_0_scale__log_factor")
    tied = [b for b in fast.manifest["quantized"]["biases"] if b["activation_scale"] == "/15/GlobalAveragePool_output_0_scale"]
    assert [b["tensor"] for b in tied] == ["17.bias_quantized"]
    params = np.zeros(fast.num_params, np.float32)
    params[entry["offset"]] = np.log(1.23)  # not 1.5: x 1.5 puts uint8 values on rounding ties, where onnxruntime's
    # fused and unfused kernels round apart (the same 5e-4 at the model input's scale, with no bias there to tie)
    run_cli("write-back", art, _save(tmp_path / "p.npy", params), "--out", tmp_path / "w.onnx", check=True)
    written = onnx.load(tmp_path / "w.onnx")
    assert Counter(n.op_type for n in written.graph.node) == Counter(n.op_type for n in onnx.load(qdq).graph.node)
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(qdq).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert np.allclose(after["/15/GlobalAveragePool_output_0_scale"], 1.23 * before["/15/GlobalAveragePool_output_0_scale"])
    untied = onnx.load(qdq)  # the scale alone, as a tool unaware of the tie would write it
    scale = next(t for t in untied.graph.initializer if t.name == "/15/GlobalAveragePool_output_0_scale")
    scale.CopyFrom(numpy_helper.from_array(after[scale.name], scale.name))
    onnx.save(untied, tmp_path / "untied.onnx")
    gap = {}
    for name in ("w.onnx", "untied.onnx"):
        fused, plain = (cross_entropy(session(tmp_path / name, o).run(None, {"image": x})[0], y) for o in (True, False))
        gap[name] = abs(fused - plain)
    trained = fast.outputs(params, {"image": x}, {"target": y})[0]
    plain = cross_entropy(session(tmp_path / "w.onnx").run(None, {"image": x})[0], y)
    # fused int8 kernels round a value on a tie apart from the unfused graph now and then (1e-5 relative)
    assert gap["w.onnx"] < 3e-5 * trained < gap["untied.onnx"] / 10, gap
    assert abs(plain - trained) < 1e-5 * max(1.0, trained), (plain, trained)


def _save(path, array):
    np.save(path, array)
    return path


def test_faster_paths_equal_naive_within_float32_rounding(qdq, data, tmp_path):
    _, x, y = data
    for selection in (dict(scales=True, biases=True), dict(last_layers=1), dict(lora=2, scales=True)):
        art = export_onnx(qdq, tmp_path / "_".join(selection), "cross_entropy", log=lambda line: None, **selection)
        fast, naive = load_artifact(art, "cpu"), load_artifact(art, "cpu", engine="naive")
        assert_fast_equals_naive(fast, naive, fast.feeds(x[:32], y[:32]), budget=24, steps=2, rtol=1e-5)


def test_direction_probes_run_the_frozen_part_once_and_equal_naive(qdq, data, tmp_path):
    """MeZO, SPSA and ZO-SGD move every weight in every row: the frozen backbone runs once, the head (its int8
    weights quantized from the float master in the loss graph) once per row; equal to naive within 1e-5."""
    from edgezo.runtime.optim import MeZOSGD, SPSA, ZOSGD
    _, x, y = data
    art = export_onnx(qdq, tmp_path / "head", "cross_entropy", last_layers=1, log=lambda line: None)
    fast, naive = load_artifact(art, "cpu"), load_artifact(art, "cpu", engine="naive")
    feed = fast.feeds(x[:32], y[:32])
    for kind in (MeZOSGD, SPSA, ZOSGD):
        probe = kind(fast.initial_params(), lr=0.01, mu=0.01, directions=4, seed=1).ask()
        a, b = fast.losses(fast.initial_params(), probe, feed, feed), naive.losses(naive.initial_params(), probe,
                                                                                  feed, feed)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=0)
    assert set(fast.paths_taken()) == {"prefix"} and set(naive.paths_taken()) == {"naive"}


def test_unrepresentable_values_are_one_line_errors(qdq, tmp_path):
    art = export_onnx(qdq, tmp_path / "art", "cross_entropy", scales=True, biases=True, log=lambda line: None)
    manifest = load_artifact(art, "cpu").manifest
    bias = next(e for e in manifest["trainable"] if e["name"] == "17.bias_quantized__float")
    params = np.load(art / "params.npy")
    params[bias["offset"]] = 1e12
    proc = run_cli("write-back", art, _save(tmp_path / "p.npy", params), "--out", tmp_path / "x.onnx")
    assert proc.returncode == 2 and "does not fit int32" in proc.stderr and len(proc.stderr.splitlines()) == 1
    params = np.load(art / "params.npy")
    scale = next(e for e in manifest["trainable"] if e["name"].endswith("__log_factor"))
    params[scale["offset"]] = -200.0  # a scale of scale0 * exp(-200) underflows to 0
    proc = run_cli("write-back", art, _save(tmp_path / "q.npy", params), "--out", tmp_path / "x.onnx")
    assert proc.returncode == 2 and "positive finite" in proc.stderr and not (tmp_path / "x.onnx").exists()


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    """The deployed transformer test model through quantize_dynamic (MatMulInteger + DynamicQuantizeLinear)."""
    from deployed import export
    from onnxruntime.quantization import QuantType, quantize_dynamic
    folder = tmp_path_factory.mktemp("dynamic")
    shape = export("transformer", folder / "float.onnx")
    quantize_dynamic(str(folder / "float.onnx"), str(folder / "dynamic.onnx"), weight_type=QuantType.QInt8)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, *shape)).astype(np.float32), rng.integers(0, 10, 64)
    np.savez(folder / "d.npz", x=x, target=y)
    return folder / "dynamic.onnx", folder / "d.npz", x, y


def test_dynamic_quantization_trains_writes_back_and_never_stacks_past_its_quantizer(dynamic, tmp_path):
    path, data_path, x, y = dynamic
    assert "of MatMulInteger: scale" in run_cli("export-onnx", path, "--list", check=True).stdout
    art = export_onnx(path, tmp_path / "art", "cross_entropy", scales=True, biases=True, last_layers=1,
                      log=lambda line: None)
    run_cli("train", art, "--data", data_path, "--budget", "24", "--lr", "0.05", "--eps", "0.05", "--batch-size",
            "32", "--out", tmp_path / "run", block_torch=True, check=True)
    trained_path, source = tmp_path / "run" / "trained.onnx", onnx.load(path)
    trained = onnx.load(trained_path)
    assert Counter(n.op_type for n in trained.graph.node) == Counter(n.op_type for n in source.graph.node)
    kinds = {t.name: t.data_type for t in trained.graph.initializer}
    assert kinds == {t.name: t.data_type for t in source.graph.initializer}
    params = np.load(tmp_path / "run" / "params.npy")
    fast, naive = load_artifact(art, "cpu"), load_artifact(art, "cpu", engine="naive")
    trained_loss = fast.outputs(params, {"x": x}, {"target": y})[0]
    deployed = cross_entropy(session(trained_path).run(None, {"x": x})[0], y)
    assert abs(deployed - trained_loss) < 1e-5 * max(1.0, abs(trained_loss)), (deployed, trained_loss)
    feed = fast.feeds(x[:16], y[:16])
    probe = CoCD(params.copy(), lr=0.1, eps=0.05, budget=16).ask()
    a, b = fast.losses(params, probe, feed, feed), naive.naive_losses(params, probe, feed)
    assert np.allclose(a, b, rtol=1e-5, atol=0), np.max(np.abs(a - b) / np.abs(b))
    assert "past DynamicQuantizeLinear: one scale from the whole batch" in fast.engine_note
    assert "stacked" not in fast.paths_taken()
    from edgezo.runtime.optim import MeZOSGD  # direction probes are never stacked: each row a call of its own
    probe = MeZOSGD(params.copy(), lr=0.01, mu=0.01, directions=4).ask()
    np.testing.assert_allclose(fast.losses(params, probe, feed, feed), naive.losses(params, probe, feed, feed),
                               rtol=1e-5, atol=0)


def test_a_fresh_int8_head_is_int8_from_the_start(qdq, tmp_path):
    art = export_onnx(qdq, tmp_path / "art", "cross_entropy", num_classes=5, last_layers=1, log=lambda line: None)
    inference = onnx.load(art / "inference.onnx")
    tensors = {t.name: numpy_helper.to_array(t) for t in inference.graph.initializer}
    weight, bias = tensors["17.weight_quantized"], tensors["17.bias_quantized"]
    assert weight.dtype == numpy_helper.to_array(next(t for t in onnx.load(qdq).graph.initializer
                                                      if t.name == "17.weight_quantized")).dtype
    assert weight.shape == (5, 32) and bias.shape == (5,) and bias.dtype == np.int32
    logits = session(art / "inference.onnx").run(None, {"image": np.zeros((2, 1, 28, 28), np.float32)})[0]
    assert logits.shape == (2, 5)
    # the quantizer's headroom: the initial weights use about a quarter of the int8 range
    center = 0 if weight.dtype == np.int8 else 128
    assert 20 <= np.abs(weight.astype(np.int32) - center).max() <= 40


def test_lora_and_the_same_weight_trained_is_refused_in_one_line(qdq, tmp_path):
    proc = run_cli("export-onnx", qdq, "--lora", "2", "--last-layers", "1", "--loss", "cross_entropy", "--out",
                   tmp_path / "art")
    assert proc.returncode == 2 and "or its LoRA adapters, not both" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "art").exists()


def test_activation_scales_of_a_float_model_is_a_one_line_error(tmp_path):
    proc = run_cli("export-onnx", MODEL, "--activation-scales", "--loss", "cross_entropy", "--out", tmp_path / "a")
    assert proc.returncode == 2 and "no quantized activations" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
