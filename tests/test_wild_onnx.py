"""ONNX files as they come from other tools: Constant-node weights, old opsets, Softmax/Sigmoid heads, state
inputs with the batch on axis 1, Identity aliases of shared weights, If subgraphs; selection presets and LoRA."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from edgezo.exporters.onnx_import import export_onnx
from edgezo.runtime import load_artifact
from edgezo.runtime.optim import CoCD, CoordinateProbe
from test_engine import assert_paths_taken

RNG = np.random.default_rng(1)


def arr(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def const(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def save(tmp_path, nodes, inits, inputs, outputs, opset=17, name="m.onnx"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 7 if opset < 15 else model.ir_version)
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / name)
    return tmp_path / name


X = ("x", TensorProto.FLOAT, ["N", 4])


def softmax_mlp(tmp_path, opset=11, constants=True, tail=()):
    """Gemm-Relu-Gemm-Softmax (axis 1), weights as Constant nodes (Paddle2ONNX style) or initializers."""
    w = {"w1": arr(4, 6), "b1": arr(6), "w2": arr(6, 3), "b2": arr(3)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2"),
             helper.make_node("Softmax", ["logits"], ["prob" if tail else "out"], axis=1)] + list(tail)
    if constants:
        nodes = [const(k, v) for k, v in w.items()] + nodes
    return save(tmp_path, nodes, {} if constants else w, [X], [("out", TensorProto.FLOAT, ["N", 3])], opset), w


def np_forward(w, x):
    return np.maximum(x @ w["w1"] + w["b1"], 0) @ w["w2"] + w["b2"]


def np_ce(logits, y):
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    return float(-(z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(len(y)), y].mean())


def values(manifest, params):
    return {e["name"]: params[e["offset"]:e["offset"] + e["size"]].reshape(e["shape"]) for e in manifest["trainable"]}


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 17])
def test_constant_weights_old_opsets_and_softmax_head(tmp_path, opset):
    path, w = softmax_mlp(tmp_path, opset)
    art = export_onnx(path, tmp_path / "art", None, last_layers=1, log=lambda line: None)
    artifact = load_artifact(art, device="cpu")
    m = artifact.manifest
    assert [e["name"] for e in m["trainable"]] == ["w2", "b2"] and m["loss"]["logits"] == "logits"
    assert m["loss"]["kind"] == "cross_entropy" and m["loss"]["head"] == "Softmax"
    params = artifact.initial_params() + arr(m["num_params"], scale=0.1)
    x, y = arr(16, 4, scale=1.0), RNG.integers(0, 3, 16)
    trained = dict(w, **values(m, params))
    assert artifact.loss(params, x, y) == pytest.approx(np_ce(np_forward(trained, x), y), rel=1e-5)
    probe = CoCD(params.copy(), lr=0.1, eps=0.01, budget=7).ask()  # engine (on the logits) vs naive
    fast = artifact.losses(params, probe, {"x": x}, {"target": y})
    naive = artifact.naive_losses(params, probe, artifact.feeds({"x": x}, {"target": y}))
    assert np.allclose(fast, naive, rtol=1e-5)
    written = tmp_path / "trained.onnx"
    from edgezo.exporters.onnx_graph import write_back
    write_back(art / "inference.onnx", m["trainable"], params, written)
    model = onnx.load(written)
    kept = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    assert set(kept) == set(w) and not model.graph.initializer, "weights stay Constant nodes"
    assert np.array_equal(kept["w2"], trained["w2"]) and model.opset_import[0].version == opset
    prob = ort.InferenceSession(str(written), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    e = np.exp(np_forward(trained, x) - np_forward(trained, x).max(1, keepdims=True))
    assert np.allclose(prob, e / e.sum(1, keepdims=True), atol=1e-6), "the model's own Softmax output is kept"


def test_softmax_followed_by_reshape_and_sigmoid_head(tmp_path):
    tail = [const("shape", np.array([-1, 3], np.int64)), helper.make_node("Reshape", ["prob", "shape"], ["out"])]
    path, w = softmax_mlp(tmp_path, 13, constants=False, tail=tail)
    art = load_artifact(export_onnx(path, tmp_path / "a", None, trainable=["w*"], log=lambda line: None), "cpu")
    assert art.manifest["loss"]["logits"] == "logits"
    x, y = arr(8, 4, scale=1.0), RNG.integers(0, 3, 8)
    assert art.loss(art.initial_params(), x, y) == pytest.approx(np_ce(np_forward(w, x), y), rel=1e-5)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["z"]), helper.make_node("Sigmoid", ["z"], ["out"])]
    wb = {"w": arr(4, 2), "b": arr(2)}
    path = save(tmp_path, nodes, wb, [X], [("out", TensorProto.FLOAT, ["N", 2])], name="sig.onnx")
    art = load_artifact(export_onnx(path, tmp_path / "b", None, trainable=["*"], log=lambda line: None), "cpu")
    assert art.manifest["loss"]["kind"] == "binary_cross_entropy"
    t = RNG.integers(0, 2, (8, 2)).astype(np.float32)
    z = (x @ wb["w"] + wb["b"]).astype(np.float64)
    bce = np.mean(np.logaddexp(0, z) - z * t)
    assert art.loss(art.initial_params(), x, t) == pytest.approx(bce, rel=1e-5)
    probe = CoCD(art.initial_params(), lr=0.1, eps=0.01, budget=5).ask()
    feed = art.feeds({"x": x}, {"target": t})
    assert np.allclose(art.losses(art.initial_params(), probe, feed, feed), art.naive_losses(art.initial_params(),
                                                                                             probe, feed), rtol=1e-5)


def state_model(tmp_path):
    """out = x W + b + sum over the 2 layers of state h [2, N, 3] (the batch on axis 1), times sr / 16000."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"]),
             helper.make_node("ReduceSum", ["h", "axes"], ["hs"], keepdims=0),
             helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["srf", "k"], ["scale"]), helper.make_node("Mul", ["hs", "scale"], ["hss"]),
             helper.make_node("Add", ["g", "hss"], ["out"])]
    w = {"w": arr(4, 3), "b": arr(3), "k": np.array(16000, np.float32)}
    inits = dict(w, axes=np.array([0], np.int64))
    path = save(tmp_path, nodes, inits, [X, ("h", TensorProto.FLOAT, [2, "N", 3]), ("sr", TensorProto.INT64, [])],
                [("out", TensorProto.FLOAT, ["N", 3])], name="state.onnx")
    return path, w


def test_state_input_with_batch_on_axis_1_fixed_or_fed_from_data(tmp_path):
    path, w = state_model(tmp_path)
    h = arr(2, 3)
    np.save(tmp_path / "h.npy", h)
    art = load_artifact(export_onnx(path, tmp_path / "fixed", "mse", trainable=["w", "b"], log=lambda line: None,
                                    fix_input=[f"h={tmp_path / 'h.npy'}", "sr=8000"]), "cpu")
    x, t = arr(5, 4, scale=1.0), arr(5, 3)
    want = x @ w["w"] + w["b"] + h.sum(0) * 0.5
    assert art.loss(art.initial_params(), x, t) == pytest.approx(np.mean((want - t) ** 2), rel=1e-5)
    art = load_artifact(export_onnx(path, tmp_path / "fed", "mse", trainable=["w"], fix_input=["sr=16000"],
                                    log=lambda line: None), "cpu")
    spec = {v["name"]: v["shape"] for v in art.manifest["inputs"]}
    assert spec == {"x": ["batch", 4], "h": ["batch", 2, 3]} and art.manifest["source"]["batch_axes"] == {"h": 1}
    hb = arr(5, 2, 3)  # batch-first in the data file
    want = x @ w["w"] + w["b"] + hb.sum(1)
    assert art.loss(art.initial_params(), {"x": x, "h": hb}, t) == pytest.approx(np.mean((want - t) ** 2), rel=1e-5)


def test_identity_aliases_and_shared_weights(tmp_path):
    """torch's legacy exporter merges equal initializers into one and reads it through Identity aliases."""
    nodes = [helper.make_node("Identity", ["ln_w"], ["enc.1.norm2.weight"]),
             helper.make_node("Identity", ["ln_w"], ["enc.0.norm2.weight"]),
             helper.make_node("Mul", ["x", "enc.0.norm2.weight"], ["a"], name="norm_a"),
             helper.make_node("Mul", ["a", "enc.1.norm2.weight"], ["out"], name="norm_b")]
    path = save(tmp_path, nodes, {"ln_w": arr(4)}, [X], [("out", TensorProto.FLOAT, ["N", 4])])
    lines = []
    art = export_onnx(path, tmp_path / "art", "mse", trainable=["enc.1.norm2.*"], log=lines.append)
    m = load_artifact(art, "cpu").manifest
    assert [e["name"] for e in m["trainable"]] == ["ln_w"]
    assert any("shared by 2 nodes (norm_a, norm_b)" in line for line in lines), lines
    listing = run_cli("export-onnx", path, "--list", check=True).stdout
    assert "shared by 2 nodes" in listing and "enc.1.norm2.weight" in listing


def if_model(tmp_path):
    """A Gemm head after an If whose branches read initializers (a flag input picks the branch)."""
    then = helper.make_graph([helper.make_node("Mul", ["x", "t_w"], ["y1"])], "then", [],
                             [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Add", ["x", "t_w"], ["y2"])], "else", [],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Cast", ["flag"], ["cond"], to=TensorProto.BOOL),
             helper.make_node("If", ["cond"], ["feat"], then_branch=then, else_branch=other),
             helper.make_node("Gemm", ["feat", "w", "b"], ["out"], name="head")]
    w = {"t_w": arr(4), "w": arr(4, 2), "b": arr(2)}
    return save(tmp_path, nodes, w, [X, ("flag", TensorProto.INT64, [])], [("out", TensorProto.FLOAT, ["N", 2])],
                name="if.onnx"), w


def test_if_subgraph_model_trains_and_refuses_branch_weights(tmp_path):
    path, w = if_model(tmp_path)
    proc = run_cli("export-onnx", path, "--trainable", "t_w", "--loss", "mse", "--fix-input", "flag=1", "--out",
                   tmp_path / "bad")
    assert proc.returncode == 2 and "If/Loop subgraph" in proc.stderr and not (tmp_path / "bad").exists()
    run_cli("export-onnx", path, "--last-layers", "1", "--loss", "mse", "--fix-input", "flag=1", "--out",
            tmp_path / "art", check=True)
    data = tmp_path / "d.npz"
    np.savez(data, x=arr(32, 4), y=arr(32, 2))
    proc = run_cli("train", tmp_path / "art", "--data", data, "--budget", "4", "--batch-size", "8", "--out",
                   tmp_path / "run", block_torch=True, check=True)
    assert (tmp_path / "run" / "trained.onnx").exists(), proc.stdout


def layer_models(tmp_path):
    """A Gemm (transB), a MatMul + Add and a Conv: the three layouts LoRA handles."""
    nodes = [helper.make_node("Conv", ["img", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], transB=1, name="gemm"),
             helper.make_node("MatMul", ["g", "mw"], ["m"], name="matmul"), helper.make_node("Add", ["m", "mb"], ["out"])]
    w = {"cw": arr(3, 2, 3, 3), "cb": arr(3), "gw": arr(5, 3 * 4 * 4), "gb": arr(5), "mw": arr(5, 4), "mb": arr(4)}
    return save(tmp_path, nodes, w, [("img", TensorProto.FLOAT, ["N", 2, 4, 4])],
                [("out", TensorProto.FLOAT, ["N", 4])], name="layers.onnx")


def test_lora_write_back_equals_the_merged_computation(tmp_path):
    path = layer_models(tmp_path)
    art = load_artifact(export_onnx(path, tmp_path / "art", "mse", lora=2, log=lambda line: None), "cpu")
    m = art.manifest
    assert {a["weight"]: a["layout"] for a in m["lora"]} == {"cw": "conv", "gw": "out_in", "mw": "in_out"}
    assert m["num_params"] == 2 * (3 + 18) + 2 * (5 + 48) + 2 * (4 + 5)
    params = art.initial_params() + arr(m["num_params"], scale=0.3)
    img, t = arr(6, 2, 4, 4), arr(6, 4)
    loss, out = art.outputs(params, img, t)
    from edgezo.exporters.onnx_graph import write_back
    written = write_back(art.file("inference"), m["trainable"], params, tmp_path / "merged.onnx", lora=m["lora"])
    model = onnx.load(written)
    assert len(model.graph.node) == 6 and {t.name for t in model.graph.initializer} == {"cw", "cb", "gw", "gb",
                                                                                      "mw", "mb"}
    theirs = ort.InferenceSession(str(written), providers=["CPUExecutionProvider"]).run(None, {"img": img})[0]
    assert np.max(np.abs(out - theirs)) <= 1e-5 * (1 + np.max(np.abs(theirs)))
    assert loss == pytest.approx(float(np.mean((theirs.astype(np.float64) - t) ** 2)), rel=1e-5)
    start = art.initial_params()
    _, base = art.outputs(start, img, t)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"img": img})[0]
    assert np.allclose(base, plain, atol=1e-6), "B = 0 at start: the adapters change nothing"
    # adapters: their layer runs alone per perturbation (W + B A computed from the params), the rest stacked
    assert all(p.startswith(("op-stacked: ", "generic: ")) for p in art.tensor_paths().values())
    probe = CoCD(params.copy(), lr=0.1, eps=0.01, budget=m["num_params"]).ask()
    feed = art.feeds({"img": img}, {"target": t})
    assert np.allclose(art.losses(params, probe, feed, feed), art.naive_losses(params, probe, feed), rtol=1e-5)


@pytest.mark.parametrize("preset", [["--norms"], ["--lora", "2", "--lora-targets", "fc*"], ["--biases"]])
def test_presets_train_and_write_back_through_the_cli(tmp_path, preset):
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("BatchNormalization", ["h", "s", "t", "mu", "var"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Gemm", ["r", "w2", "b2"], ["z"], name="fc2"),
             helper.make_node("Softmax", ["z"], ["out"], axis=-1)]
    w = {"w1": arr(4, 6), "b1": arr(6), "s": 1 + arr(6, scale=0.1), "t": arr(6), "mu": arr(6),
         "var": 1 + np.abs(arr(6)), "w2": arr(6, 3), "b2": arr(3)}
    path = save(tmp_path, nodes, w, [X], [("out", TensorProto.FLOAT, ["N", 3])])
    listing = run_cli("export-onnx", path, "--list", check=True).stdout
    assert "--norms" in listing and "fc2" in listing
    run_cli("export-onnx", path, *preset, "--out", tmp_path / "art", check=True)
    m = load_artifact(tmp_path / "art", "cpu").manifest
    want = {"--norms": ["s", "t"], "--lora": ["w1__lora_A", "w1__lora_B", "w2__lora_A", "w2__lora_B"],
            "--biases": ["b1", "t", "b2"]}[preset[0]]
    assert sorted(e["name"] for e in m["trainable"]) == sorted(want)
    data = tmp_path / "d.npz"
    np.savez(data, x=arr(64, 4, scale=1.0), y=RNG.integers(0, 3, 64))
    run_cli("train", tmp_path / "art", "--data", data, "--budget", "8", "--batch-size", "16", "--epochs", "2",
            "--lr", "0.05", "--eps", "0.01", "--out", tmp_path / "run", block_torch=True, check=True)
    run_cli("write-back", tmp_path / "art", tmp_path / "run" / "params.npy", "--out", tmp_path / "final.onnx",
            block_torch=True, check=True)
    final = onnx.load(tmp_path / "final.onnx")
    assert [n.op_type for n in final.graph.node] == [n.op_type for n in nodes], "the deployed graph is kept"
    changed = {t.name for t in final.graph.initializer if not np.array_equal(numpy_helper.to_array(t), w[t.name])}
    assert changed == ({"w1", "w2"} if preset[0] == "--lora" else set(want)), changed


def test_num_classes_gives_a_fresh_head(tmp_path):
    path, _ = softmax_mlp(tmp_path, 13, constants=False)
    art = load_artifact(export_onnx(path, tmp_path / "art", None, last_layers=1, num_classes=5, seed=3,
                                    log=lambda line: None), "cpu")
    assert art.manifest["loss"]["num_classes"] == 5
    assert {e["name"]: e["shape"] for e in art.manifest["trainable"]} == {"w2": [6, 5], "b2": [5]}
    out = ort.InferenceSession(str(art.file("inference")), providers=["CPUExecutionProvider"]).run(
        None, {"x": arr(2, 4)})[0]
    assert out.shape == (2, 5)


def test_cli_refuses_nan_data_and_bad_params_files(tmp_path):
    path, _ = softmax_mlp(tmp_path, 13, constants=False)
    run_cli("export-onnx", path, "--last-layers", "1", "--out", tmp_path / "art", check=True)
    x = arr(128, 4)
    x[7, 2] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=RNG.integers(0, 3, 128))
    proc = run_cli("train", tmp_path / "art", "--data", tmp_path / "d.npz", "--out", tmp_path / "run")
    assert proc.returncode == 2 and "'x'" in proc.stderr and "row 7" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
    np.save(tmp_path / "p2d.npy", np.zeros((3, 7), np.float32))
    proc = run_cli("write-back", tmp_path / "art", tmp_path / "p2d.npy", "--out", tmp_path / "o.onnx")
    assert proc.returncode == 2 and "(21,)" in proc.stderr and not (tmp_path / "o.onnx").exists(), proc.stderr


def test_python_api_trains_resumes_and_writes_back_without_the_cli(tmp_path):
    from edgezo.runtime import run
    path, _ = softmax_mlp(tmp_path, 13, constants=False)
    art = export_onnx(path, tmp_path / "art", None, last_layers=1, log=lambda line: None)
    np.savez(tmp_path / "d.npz", x=arr(96, 4, scale=1.0), y=RNG.integers(0, 3, 96))
    whole = run.train(art, tmp_path / "d.npz", tmp_path / "whole", epochs=2, batch_size=16, budget=5, lr=0.05,
                      log=lambda line: None)
    lines = []
    with pytest.raises(run.EdgezoError, match="unknown training setting 'bugdet'"):
        run.train(art, tmp_path / "d.npz", tmp_path / "typo", bugdet=5)
    # an interrupted run: a checkpoint mid-way, metrics not yet written; resume finishes it bit-identically
    part = run.train(art, tmp_path / "d.npz", tmp_path / "part", epochs=2, batch_size=16, budget=5, lr=0.05,
                     checkpoint_every=4, log=lines.append)
    (tmp_path / "part" / "metrics.json").unlink()
    resumed = run.resume(tmp_path / "part", log=lines.append)
    assert resumed["steps"] == whole["steps"] == part["steps"] == 12
    assert np.array_equal(np.load(tmp_path / "part" / "params.npy"), np.load(tmp_path / "whole" / "params.npy"))
    out = run.write_back(tmp_path / "whole", tmp_path / "adapted.onnx")
    assert onnx.load(out).graph.output[0].name == "out"


def test_engine_runs_the_frozen_backbone_once_whatever_its_ops(tmp_path):
    """The demo's deployed model has depthwise (grouped) convs the numpy layers do not cover: with only the
    head trainable, the backbone is the frozen part (one onnxruntime call) and the engine applies, exactly."""
    from edgezo.adapt_demo import MODEL
    art = load_artifact(export_onnx(MODEL, tmp_path / "art", "cross_entropy", last_layers=1, log=lambda line: None),
                        "cpu")
    assert art.fast_engine() is not None, art.engine_note
    params = art.initial_params() + arr(art.num_params, scale=0.05)
    x, y = RNG.random((16, 1, 28, 28), dtype=np.float32), RNG.integers(0, 10, 16)
    feed = art.feeds({"image": x}, {"target": y})
    opt = CoCD(params.copy(), lr=0.1, eps=0.01, budget=40)
    for _ in range(3):  # steps across the head's weight and bias
        probe = opt.ask()
        fast, naive = art.losses(params, probe, feed, feed), art.naive_losses(params, probe, feed)
        assert np.allclose(fast, naive, rtol=1e-5, atol=0)
        opt.tell(naive)
    assert art.paths_taken() == {"engine": 3 * 80}  # every row in the engine's kernels, none naive
    whole = load_artifact(export_onnx(MODEL, tmp_path / "all", "cross_entropy", trainable=["*weight", "17.bias"],
                                      log=lambda line: None), "cpu")
    paths = whole.tensor_paths()  # per tensor: the head in numpy, the layers before it stacked in onnxruntime
    assert paths["17.weight"] == "engine" and paths["17.bias"] == "engine"
    assert paths["1.weight"].startswith("stacked: Conv")  # BN scale: onnxruntime runs the rest, stacked
    assert paths["3.weight"].startswith("stacked: ")  # the depthwise conv's own weight: its output directly
    assert not any(path.startswith("generic") for path in paths.values()), paths
    assert "stacked in onnxruntime" in whole.engine_note
    params = whole.initial_params() + arr(whole.num_params, scale=0.01)
    n = whole.num_params
    probe = CoordinateProbe(np.array([0, 5, 150, 165, n - 300, n - 1, n - 300, 0]),
                            np.array([0.01] * 6 + [-0.01] * 2, np.float32))
    feed = whole.feeds({"image": x}, {"target": y})
    assert np.allclose(whole.losses(params, probe, feed, feed), whole.naive_losses(params, probe, feed), rtol=1e-5)
    assert_paths_taken(whole.paths_taken(), paths, whole.manifest, [probe])


def test_export_of_a_torch_model_takes_the_same_selections(tmp_path):
    run_cli("export", "--model", "sarcos-mlp", "--biases", "--last-layers", "1", "--out", tmp_path / "b", check=True)
    names = [e["name"] for e in load_artifact(tmp_path / "b", "cpu").manifest["trainable"]]
    assert names == ["0.bias", "2.bias", "4.bias", "6.bias", "8.weight", "8.bias"]
    run_cli("export", "--model", "sarcos-mlp", "--lora", "2", "--lora-targets", "8.*", "--out", tmp_path / "l",
            check=True)
    m = load_artifact(tmp_path / "l", "cpu").manifest
    assert [a["weight"] for a in m["lora"]] == ["8.weight"] and m["num_params"] == 2 * (32 + 7)


def test_dynamic_width_is_taken_from_the_data(tmp_path):
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2], keepdims=0),
             helper.make_node("Gemm", ["m", "w", "b"], ["out"])]
    w = {"w": arr(4, 2), "b": arr(2)}
    path = save(tmp_path, nodes, w, [("x", TensorProto.FLOAT, ["N", 4, "W"])], [("out", TensorProto.FLOAT, ["N", 2])],
                opset=13)
    art = load_artifact(export_onnx(path, tmp_path / "art", "mse", trainable=["*"], log=lambda line: None), "cpu")
    assert art.manifest["inputs"][0]["shape"] == ["batch", 4, "W"]
    for width in (3, 9):  # the smoke test used batch 2, width 8; any width trains
        x, t = arr(5, 4, width), arr(5, 2)
        want = x.mean(2) @ w["w"] + w["b"]
        assert art.loss(art.initial_params(), x, t) == pytest.approx(np.mean((want - t) ** 2), rel=1e-5)
