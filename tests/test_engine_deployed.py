"""The engine on architectures people deploy (benchmarks/deployed.py, exported by torch's TorchScript exporter):
losses within 1e-5 of the naive path's and difference quotients within 1e-3, on steps sampled across the
coordinate cycle, for the head, the last block with the head, and all weights."""
import numpy as np
import pytest

import deployed  # benchmarks/deployed.py (conftest puts benchmarks/ on the path)
from edgezo.exporters.onnx_import import export_onnx
from edgezo.runtime import load_artifact
from test_engine import assert_paths_taken, check_step, probes

SMALL = {"mobilenetv3_small": dict(width=0.25, side=32, hidden=64),
         "resnet18": dict(width=8, side=32),
         "transformer": dict(d=32, ff=64, seq=8, features=8)}
STEPS = {"head": 1, "block": 4, "all": 6}  # steps sampled per cycle


@pytest.fixture(scope="module")
def deployed_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deployed")
    return {name: (folder / f"{name}.onnx", deployed.export(name, folder / f"{name}.onnx", **kw))
            for name, kw in SMALL.items()}


@pytest.mark.parametrize("selection", ["head", "block", "all"])
@pytest.mark.parametrize("name", list(SMALL))
def test_engine_matches_naive(deployed_file, tmp_path, name, selection):
    path, shape = deployed_file[name]
    art = export_onnx(path, tmp_path / "art", "cross_entropy", trainable=deployed.SELECTIONS[name][selection],
                      log=lambda line: None)
    fast, naive = load_artifact(art, device="cpu", threads=1), load_artifact(art, device="cpu", engine="naive")
    assert fast.fast_engine() is not None, fast.engine_note
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, *shape)).astype(np.float32), np.array([1, 4, 7])
    params = fast.initial_params()
    budget = 16
    cycle = -(-fast.num_params // budget)
    every = max(1, cycle // STEPS[selection])
    evaluated = list(probes(fast, budget, 1e-2, every=every))
    for probe in evaluated:
        check_step(fast.losses(params, probe, x, y), naive.losses(params, probe, x, y), 1e-2, budget)
    paths = fast.tensor_paths()
    assert_paths_taken(fast.paths_taken(), paths, fast.manifest, evaluated)
    assert set(paths) == {e["name"] for e in fast.manifest["trainable"]}
    if selection == "head":
        assert set(paths.values()) == {"engine"}, paths


def test_constant_node_weights_and_an_if_between_trainable_layers(tmp_path):
    """A Paddle-style file: Gemm weights as Constant nodes, an If (picked by a fixed flag input) whose
    branches read the first layer's output from the outer scope: every path matches naive."""
    from onnx import TensorProto, helper
    from test_wild_onnx import arr, const, save
    then = helper.make_graph([helper.make_node("Tanh", ["h"], ["y1"])], "then", [],
                             [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Relu", ["h"], ["y2"])], "else", [],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)])
    nodes = [const("w1", arr(4, 6)), const("b1", arr(6)), const("w2", arr(6, 3)), const("b2", arr(3)),
             helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"]),
             helper.make_node("Cast", ["flag"], ["cond"], to=TensorProto.BOOL),
             helper.make_node("If", ["cond"], ["feat"], then_branch=then, else_branch=other),
             helper.make_node("MatMul", ["feat", "w2"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["out"])]
    path = save(tmp_path, nodes, {}, [("x", TensorProto.FLOAT, ["N", 4]), ("flag", TensorProto.INT64, [])],
                [("out", TensorProto.FLOAT, ["N", 3])], opset=11)
    art = export_onnx(path, tmp_path / "art", "cross_entropy", trainable=["*"], fix_input=["flag=1"],
                      log=lambda line: None)
    fast, naive = load_artifact(art, device="cpu"), load_artifact(art, device="cpu", engine="naive")
    paths = fast.tensor_paths()
    assert paths["w1"] == paths["b1"] == "stacked: If" and paths["w2"] == paths["b2"] == "engine", paths
    x, y = np.random.default_rng(5).standard_normal((6, 4)).astype(np.float32), np.array([0, 1, 2, 2, 1, 0])
    params = fast.initial_params()
    from edgezo.runtime.engine import DeviceEngine
    device = DeviceEngine(fast.fast_engine(), "cpu")  # opset 11 upgraded to 13, the If inside the fused graph
    feed = fast.feeds(x, y)
    for probe in probes(fast, 5, 1e-2):
        check_step(fast.losses(params, probe, x, y), naive.losses(params, probe, x, y), 1e-2, 5)
        check_step(device.losses(params, probe, feed, feed), naive.losses(params, probe, x, y), 1e-2, 5)


def test_a_tensor_read_by_several_ops_takes_the_generic_path_exactly(tmp_path):
    """Tied weights (one initializer read by two MatMuls, as the TorchScript exporter makes of equal
    initializers): a perturbation moves both uses, so the generic path starts before the first one."""
    from onnx import TensorProto, helper
    from test_wild_onnx import arr, save
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w"], ["m"]), helper.make_node("Gemm", ["m", "w2", "b2"], ["out"])]
    path = save(tmp_path, nodes, {"w": arr(4, 4), "w2": arr(4, 3), "b2": arr(3)},
                [("x", TensorProto.FLOAT, ["N", 4])], [("out", TensorProto.FLOAT, ["N", 3])])
    art = export_onnx(path, tmp_path / "art", "cross_entropy", trainable=["*"], log=lambda line: None)
    fast, naive = load_artifact(art, device="cpu"), load_artifact(art, device="cpu", engine="naive")
    paths = fast.tensor_paths()
    assert paths["w"].startswith("generic: MatMul ('w' is read by 2 ops)") and paths["w2"] == "engine", paths
    x, y = np.random.default_rng(6).standard_normal((5, 4)).astype(np.float32), np.array([0, 1, 2, 1, 0])
    params = fast.initial_params()
    for probe in probes(fast, 6, 1e-2):
        check_step(fast.losses(params, probe, x, y), naive.losses(params, probe, x, y), 1e-2, 6)


@pytest.mark.parametrize("name", list(SMALL))
def test_device_engine_matches_naive(deployed_file, tmp_path, name):
    """The engine as it runs on --device cuda (kernels as ONNX graphs, activations and copies bound to the
    provider's memory, one fused session per tensor), here on the CPU provider."""
    from edgezo.runtime.engine import DeviceEngine, Path
    path, shape = deployed_file[name]
    art = export_onnx(path, tmp_path / "art", "cross_entropy", trainable=deployed.SELECTIONS[name]["block"],
                      log=lambda line: None)
    fast, naive = load_artifact(art, device="cpu", threads=1), load_artifact(art, device="cpu", engine="naive")
    device = DeviceEngine(fast.fast_engine(), "cpu")
    paths = device.tensor_paths()
    assert {p for p in paths.values() if p.startswith("device")}, paths
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((3, *shape)).astype(np.float32), np.array([2, 5, 9])
    feed = fast.feeds(x, y)
    params = fast.initial_params()
    cycle = -(-fast.num_params // 16)
    evaluated = list(probes(fast, 16, 1e-2, every=max(1, cycle // 5)))
    for probe in evaluated:
        check_step(device.losses(params, probe, feed, feed), naive.losses(params, probe, x, y), 1e-2, 16)
    assert_paths_taken(device.taken, paths, fast.manifest, evaluated)
    assert device.taken[Path.DEVICE] > 0


def test_device_engine_on_the_paper_models(mlp_artifact, cnn_artifact):
    from edgezo.runtime.engine import DeviceEngine, Path
    from test_engine import data
    for path, kind, budget in ((mlp_artifact, "mlp", 64), (cnn_artifact, "cnn", 256)):
        fast, naive = load_artifact(path, device="cpu"), load_artifact(path, device="cpu", engine="naive")
        device = DeviceEngine(fast.fast_engine(), "cpu")
        x, y = data(kind, 4, np.random.default_rng(2))
        feed = fast.feeds(x, y)
        params = fast.initial_params() + np.float32(0.01)
        evaluated = list(probes(fast, budget, 1e-2, every=30))
        for probe in evaluated:
            check_step(device.losses(params, probe, feed, feed), naive.losses(params, probe, x, y), 1e-2, budget)
        assert_paths_taken(device.taken, device.tensor_paths(), fast.manifest, evaluated)
        assert set(device.taken) == {Path.DEVICE}


def test_conv_transpose_and_dilated_grouped_convs(tmp_path):
    """A decoder-style net: strided ConvTranspose (padded, output_padding), a dilated grouped Conv, every weight
    trainable: perturbed outputs computed directly, the rest stacked; losses match naive."""
    from onnx import TensorProto, helper
    from test_wild_onnx import arr, save
    nodes = [helper.make_node("ConvTranspose", ["x", "tw", "tb"], ["t"], strides=[2, 2], pads=[1, 1, 1, 1],
                              output_padding=[1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["t"], ["r"]),
             helper.make_node("Conv", ["r", "gw", "gb"], ["g"], group=2, dilations=[2, 2], pads=[2, 2, 2, 2]),
             helper.make_node("GlobalAveragePool", ["g"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "hw", "hb"], ["out"], transB=1)]
    w = {"tw": arr(2, 4, 3, 3), "tb": arr(4), "gw": arr(4, 2, 3, 3), "gb": arr(4), "hw": arr(3, 4), "hb": arr(3)}
    path = save(tmp_path, nodes, w, [("x", TensorProto.FLOAT, ["N", 2, 5, 5])], [("out", TensorProto.FLOAT, ["N", 3])])
    art = export_onnx(path, tmp_path / "art", "cross_entropy", trainable=["*"], log=lambda line: None)
    fast, naive = load_artifact(art, device="cpu"), load_artifact(art, device="cpu", engine="naive")
    paths = fast.tensor_paths()
    assert not any(p.startswith("generic") for p in paths.values()), paths
    x, y = np.random.default_rng(7).standard_normal((4, 2, 5, 5)).astype(np.float32), np.array([0, 1, 2, 1])
    params = fast.initial_params()
    for probe in probes(fast, 8, 1e-2, every=3):
        check_step(fast.losses(params, probe, x, y), naive.losses(params, probe, x, y), 1e-2, 8)


def test_torch_export_based_exporter_files(tmp_path):
    """torch's default exporter (torch.export, opset 20) folds a Linear's transposed weight into a generated name
    ("val_43"); its node metadata keeps the module path, so "blocks.1.*" still selects it. '*' skips the int64
    shape constants. The engines match naive on it."""
    import torch
    from edgezo.exporters.onnx_prepare import torch_names
    from edgezo.runtime.engine import DeviceEngine
    model, shape = deployed.build("transformer", **SMALL["transformer"])
    path = tmp_path / "dynamo.onnx"
    torch.onnx.export(model, (torch.zeros(2, *shape),), str(path), dynamo=True, input_names=["x"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    import onnx
    names = torch_names(onnx.load(path))
    assert "blocks.1.qkv.weight" in names and names["blocks.1.qkv.weight"] != "blocks.1.qkv.weight"
    art = export_onnx(path, tmp_path / "art", "cross_entropy", trainable=deployed.SELECTIONS["transformer"]["block"],
                      log=lambda line: None)
    fast, naive = load_artifact(art, device="cpu"), load_artifact(art, device="cpu", engine="naive")
    trained = {e["name"] for e in fast.manifest["trainable"]}
    assert names["blocks.1.qkv.weight"] in trained and names["blocks.1.ff2.weight"] in trained
    assert not any(p.startswith("generic") for p in fast.tensor_paths().values())
    device = DeviceEngine(fast.fast_engine(), "cpu")
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((3, *shape)).astype(np.float32), np.array([3, 1, 4])
    feed, params = fast.feeds(x, y), fast.initial_params()
    for probe in probes(fast, 16, 1e-2, every=250):
        check_step(fast.losses(params, probe, x, y), naive.losses(params, probe, x, y), 1e-2, 16)
        check_step(device.losses(params, probe, feed, feed), naive.losses(params, probe, x, y), 1e-2, 16)
    export_onnx(path, tmp_path / "all", "cross_entropy", trainable=["*"], log=lambda line: None)  # int64 skipped


def test_cut_sessions_dropped_under_the_cap_are_made_again_exactly(deployed_file, tmp_path):
    """With no room for cut sessions beyond the few always kept, the engine holds at most those and its losses
    still equal naive's across the cycle (dropped sessions are made again when their layer comes round)."""
    from edgezo.runtime.engine.core import SESSIONS_KEPT
    path, shape = deployed_file["mobilenetv3_small"]
    art = export_onnx(path, tmp_path / "art", "cross_entropy", norms=True, biases=True, log=lambda line: None)
    fast, naive = load_artifact(art, device="cpu", threads=1), load_artifact(art, device="cpu", engine="naive")
    engine = fast.fast_engine()
    assert len(engine._suffixes) <= SESSIONS_KEPT  # the build checked every layer's suffix and kept none more
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, *shape)).astype(np.float32), np.array([1, 4, 7])
    params = fast.initial_params()
    cycle = list(probes(fast, 16, 1e-2, every=8))
    for probe in cycle:  # under the default cap the steps keep the sessions of the layers they walk
        check_step(fast.losses(params, probe, x, y), naive.losses(params, probe, x, y), 1e-2, 16)
    assert len(engine._suffixes) > SESSIONS_KEPT
    engine._suffixes.limit(0)
    engine._op_sessions.limit(0)
    for probe in cycle * 2:  # twice round: every layer's session made again
        check_step(fast.losses(params, probe, x, y), naive.losses(params, probe, x, y), 1e-2, 16)
        assert len(engine._suffixes) <= SESSIONS_KEPT
