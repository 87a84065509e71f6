"""Every fast evaluation path gives the naive path's losses (one runtime call per perturbation)."""
from collections import Counter

import numpy as np
import pytest

from edgezo.runtime import EdgezoError, load_artifact
from edgezo.runtime.optim import CoCD

ULP = np.finfo(np.float32).eps


def probes(artifact, budget, eps, central=True, every=1):
    """Probes over a full cycle of coordinates (every `every`-th step), the last wrapping to the first."""
    opt = CoCD(artifact.initial_params(), lr=0.0, eps=eps, budget=budget, central=central)
    steps = -(-artifact.num_params // budget)
    for step in sorted(set(range(0, steps, every)) | {steps - 1}):
        opt.refreshed = step * budget
        probe = opt.ask()
        opt.discard()
        yield probe


def check_step(fast, naive, eps, budget, central=True):
    assert np.all(np.abs(fast - naive) <= 1e-5 * np.abs(naive)), np.max(np.abs(fast - naive) / np.abs(naive))
    if central:
        fd_fast, fd_naive = (fast[:budget] - fast[budget:]) / (2 * eps), (naive[:budget] - naive[budget:]) / (2 * eps)
    else:
        fd_fast, fd_naive = (fast[1:] - fast[0]) / eps, (naive[1:] - naive[0]) / eps
    # 1e-3 relative, plus the float32 resolution of the naive path's own difference quotient
    resolution = 8 * ULP * np.max(np.abs(naive)) / eps
    assert np.all(np.abs(fd_fast - fd_naive) <= 1e-3 * np.abs(fd_naive) + resolution)


def assert_paths_taken(taken, paths, manifest, evaluated):
    """The probe rows each path evaluated at run time (engine.taken or artifact.paths_taken()) are those the plan
    (tensor_paths) sends there, row for row: no evaluation fell back silently to another path."""
    owner = np.empty(manifest["num_params"], object)
    for e in manifest["trainable"]:
        owner[e["offset"]:e["offset"] + e["size"]] = e["name"]
    planned = Counter(paths[owner[i]].split(":")[0] for probe in evaluated for i in probe.index[probe.delta != 0])
    taken = {getattr(path, "value", path): rows for path, rows in dict(taken).items()}
    assert "naive" not in planned and taken == dict(planned), (taken, dict(planned))


def data(kind, n, rng):
    if kind == "mlp":
        return rng.standard_normal((n, 21)).astype(np.float32), rng.standard_normal((n, 7)).astype(np.float32)
    return rng.random((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n)


@pytest.mark.parametrize("engine", ["auto", "batched"])
def test_mlp_full_cycle(mlp_artifact, engine):
    fast = load_artifact(mlp_artifact, device="cpu", engine=engine)
    naive = load_artifact(mlp_artifact, device="cpu", engine="naive")
    x, y = data("mlp", 64, np.random.default_rng(0))
    params = fast.initial_params()
    assert fast.fast_engine() is not None and naive.fast_engine() is None
    evaluated = list(probes(fast, 64, 1e-2))
    for probe in evaluated:
        check_step(fast.losses(params, probe, x, y), naive.losses(params, probe, x, y), 1e-2, 64)
    covered = np.unique(np.concatenate([p.index for p in evaluated]))  # every coordinate, across every layer
    assert np.array_equal(covered, np.arange(fast.num_params)) and len(evaluated) == -(-fast.num_params // 64)
    assert_paths_taken(fast.paths_taken(), fast.tensor_paths(), fast.manifest, evaluated)
    assert naive.paths_taken() == {"naive": len(evaluated) * 128}


@pytest.mark.parametrize("engine", ["auto", "batched"])
def test_cnn_full_cycle(cnn_artifact, engine):
    fast = load_artifact(cnn_artifact, device="cpu", engine=engine)
    naive = load_artifact(cnn_artifact, device="cpu", engine="naive")
    x, y = data("cnn", 6, np.random.default_rng(1))
    params = fast.initial_params() + np.float32(0.01)  # no exact zeros at ReLUs
    evaluated = list(probes(fast, 256, 1e-2, every=1 if engine == "auto" else 4))
    for probe in evaluated:
        check_step(fast.losses(params, probe, x, y), naive.losses(params, probe, x, y), 1e-2, 256)
    assert_paths_taken(fast.paths_taken(), fast.tensor_paths(), fast.manifest, evaluated)
    assert set(fast.paths_taken()) == {"engine"}


def test_leaky_relu_propagates_deltas(tmp_path):
    """paper-cnn-leaky: LeakyRelu has numpy code, so every tensor takes the engine, exactly."""
    from conftest import run_cli
    run_cli("export", "--model", "paper-cnn-leaky", "--out", str(tmp_path / "art"), check=True)
    fast = load_artifact(tmp_path / "art", device="cpu")
    naive = load_artifact(tmp_path / "art", device="cpu", engine="naive")
    assert set(fast.tensor_paths().values()) == {"engine"}, fast.tensor_paths()
    x, y = data("cnn", 4, np.random.default_rng(5))
    params = fast.initial_params()
    for probe in probes(fast, 256, 1e-2, every=9):
        check_step(fast.losses(params, probe, x, y), naive.losses(params, probe, x, y), 1e-2, 256)


def test_one_sided_and_small_budget(mlp_artifact, cnn_artifact):
    for path, kind, budget in ((mlp_artifact, "mlp", 13), (cnn_artifact, "cnn", 97)):
        fast = load_artifact(path, device="cpu")
        naive = load_artifact(path, device="cpu", engine="naive")
        x, y = data(kind, 5, np.random.default_rng(2))
        params = fast.initial_params()
        for probe in probes(fast, budget, 5e-2, central=False, every=7):
            assert probe.delta[0] == 0
            check_step(fast.losses(params, probe, x, y), naive.losses(params, probe, x, y), 5e-2, budget,
                       central=False)


def test_residual_graph_full_cycle(tmp_path):
    """An imported conv/BatchNorm/residual-Add/GlobalAveragePool model, every tensor trainable."""
    from test_onnx_import import conv_bn_residual
    from edgezo.exporters.onnx_import import export_onnx
    path, _, _ = conv_bn_residual(tmp_path)
    art = export_onnx(path, tmp_path / "art", "cross_entropy", trainable=["*"])
    x, y = np.random.default_rng(3).standard_normal((5, 2, 6, 6)).astype(np.float32), np.array([0, 1, 2, 1, 0])
    naive = load_artifact(art, device="cpu", engine="naive")
    params = naive.initial_params()
    for engine in ("auto", "batched"):
        fast = load_artifact(art, device="cpu", engine=engine)
        assert fast.fast_engine() is not None, fast.engine_note
        for probe in probes(fast, 7, 1e-2):
            check_step(fast.losses(params, probe, x, y), naive.losses(params, probe, x, y), 1e-2, 7)


def test_resnet20_sampled_steps(tmp_path):
    """ResNet-20 (272k params, BatchNorm in inference form, projection shortcuts): steps spread over the
    coordinate cycle, the last one wrapping to coordinate 0."""
    from conftest import run_cli
    run_cli("export", "--model", "resnet20", "--out", str(tmp_path / "r20"), check=True)
    fast = load_artifact(tmp_path / "r20", device="cpu")
    naive = load_artifact(tmp_path / "r20", device="cpu", engine="naive")
    assert fast.fast_engine() is not None, fast.engine_note
    x, y = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32), np.array([3, 7])
    params = fast.initial_params()
    n_steps = 0
    for probe in probes(fast, 32, 1e-2, every=997):
        check_step(fast.losses(params, probe, x, y), naive.losses(params, probe, x, y), 1e-2, 32)
        n_steps += 1
    assert n_steps == 10  # 8,515 steps of 32: every 997th and the last


def test_engine_falls_back_per_tensor_where_an_op_is_not_handled(tmp_path):
    from test_onnx_import import init, save
    from onnx import helper
    from edgezo.exporters.onnx_import import export_onnx
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Sigmoid", ["h"], ["s"]),
             helper.make_node("Gemm", ["s", "w2", "b2"], ["out"], transB=1)]
    path = save(tmp_path, nodes, [init("w1", 8, 4), init("b1", 8), init("w2", 3, 8), init("b2", 3)], ["N", 4],
                ["N", 3])
    art = export_onnx(path, tmp_path / "art", "mse", trainable=["*"])
    artifact = load_artifact(art, device="cpu")
    assert artifact.fast_engine() is not None and "past Sigmoid)" in artifact.engine_note
    paths = artifact.tensor_paths()  # only the tensors whose perturbations reach the Sigmoid go naive
    assert paths == {"w1": "stacked: Sigmoid", "b1": "stacked: Sigmoid", "w2": "engine",
                     "b2": "engine"}
    x, y = np.ones((3, 4), np.float32), np.zeros((3, 3), np.float32)
    from edgezo.runtime.optim import CoordinateProbe
    probe = CoordinateProbe(np.array([0, 33, 40, 66, 0, 40]), np.array([1e-2] * 4 + [-1e-2] * 2, np.float32))
    assert np.allclose(artifact.losses(artifact.initial_params(), probe, x, y),
                       load_artifact(art, device="cpu", engine="naive").losses(artifact.initial_params(), probe, x, y))
    batched = load_artifact(art, device="cpu", engine="batched")  # stacked copies, no delta propagation
    assert np.allclose(batched.losses(batched.initial_params(), probe, x, y),
                       artifact.losses(artifact.initial_params(), probe, x, y), rtol=1e-5)
    with pytest.raises(EdgezoError, match="--engine must be one of"):
        load_artifact(art, device="cpu", engine="turbo")


def test_ops_without_engine_code_downstream_take_the_stacked_path(tmp_path):
    """Erf, Sin and Einsum between a trainable layer and the loss: onnxruntime runs that part on the copies
    stacked on the batch axis (not one call per perturbation), exactly."""
    from test_onnx_import import init, save
    from onnx import helper
    from edgezo.exporters.onnx_import import export_onnx
    from edgezo.runtime.optim import CoordinateProbe
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Erf", ["h"], ["e"]),
             helper.make_node("Sin", ["e"], ["s"]), helper.make_node("Einsum", ["s"], ["t"], equation="ij->ij"),
             helper.make_node("Gemm", ["t", "w2", "b2"], ["out"], transB=1)]
    path = save(tmp_path, nodes, [init("w1", 8, 4), init("b1", 8), init("w2", 3, 8), init("b2", 3)], ["N", 4],
                ["N", 3])
    artifact = load_artifact(export_onnx(path, tmp_path / "art", "mse", trainable=["*"], log=lambda line: None), "cpu")
    paths = artifact.tensor_paths()
    assert paths["w1"].startswith("stacked: ") and {"Erf", "Sin", "Einsum"} <= {
        op.split(" ")[0] for op in paths["w1"][len("stacked: "):].split(", ")}
    assert paths["w2"] == "engine"
    x, y = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32), np.zeros((5, 3), np.float32)
    n = artifact.num_params
    index = np.arange(n)
    probe = CoordinateProbe(np.concatenate([index, index]), np.concatenate([np.full(n, 1e-2), np.full(n, -1e-2)])
                            .astype(np.float32))
    feed = artifact.feeds(x, y)
    fast, naive = artifact.losses(artifact.initial_params(), probe, x, y), \
        artifact.naive_losses(artifact.initial_params(), probe, feed)
    check_step(fast, naive, 1e-2, n)


def test_direction_probes_go_naive_where_the_first_op_trains(mlp_artifact):
    """Every layer of the MLP trains: nothing frozen to share, so direction probes take the naive path (unchanged
    trajectories), and say so in paths_taken."""
    from edgezo.runtime.optim import MeZOSGD
    art = load_artifact(mlp_artifact, "cpu")
    x = np.random.default_rng(0).standard_normal((8, 21)).astype(np.float32)
    y = np.zeros((8, 7), np.float32)
    probe = MeZOSGD(art.initial_params(), lr=0.01, mu=0.01, directions=2).ask()
    art.losses(art.initial_params(), probe, {"x": x}, {"y": y})
    assert art.paths_taken() == {"naive": 4}


def test_an_evaluation_runs_on_the_steps_base_session_and_equals_the_graphs_loss(cnn_artifact):
    """Once the engine is built, artifact.outputs() runs on the base session the steps use (no second session or
    arena), with the loss graph's own values within float32 rounding."""
    fast = load_artifact(cnn_artifact, device="cpu")
    naive = load_artifact(cnn_artifact, device="cpu", engine="naive")
    x, y = data("cnn", 48, np.random.default_rng(1))
    params = fast.initial_params()
    fast.losses(params, next(probes(fast, 16, 1e-2)), x, y)
    sessions = len(fast.fast_engine().subgraphs.sessions)
    (loss, out), (want, want_out) = fast.outputs(params, x, y), naive.outputs(params, x, y)
    assert len(fast.fast_engine().subgraphs.sessions) == sessions
    assert abs(loss - want) <= 1e-6 * abs(want) and np.allclose(out, want_out, rtol=1e-5, atol=1e-6)


def test_the_main_session_is_released_once_the_engine_serves_and_made_again_for_a_naive_call(cnn_artifact):
    """With the engine built, steps and evaluations run on its sessions: the artifact's own session of loss.onnx is
    dropped (memory), and a call that needs it (loss()) makes it again, with the loss graph's value."""
    fast = load_artifact(cnn_artifact, device="cpu")
    naive = load_artifact(cnn_artifact, device="cpu", engine="naive")
    x, y = data("cnn", 16, np.random.default_rng(2))
    params = fast.initial_params()
    assert fast.fast_engine() is not None and fast._session is None
    assert fast.loss(params, x, y) == naive.loss(params, x, y) and fast._session is not None


def test_direction_probes_share_the_steps_base_session(tmp_path):
    """On a head, a direction probe (MeZO) reads the frozen part from the same session as the coordinate steps and
    the evaluations (one session, not one more of the whole frozen part), with the naive path's losses."""
    import torch
    from edgezo.exporters import export_module
    from edgezo.exporters.models import mnist_cnn
    from edgezo.runtime.optim import MeZOSGD
    torch.manual_seed(0)
    export_module(mnist_cnn(), torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)), "cross_entropy",
                  tmp_path / "head", trainable=["9.weight", "9.bias"])
    fast = load_artifact(tmp_path / "head", device="cpu")
    naive = load_artifact(tmp_path / "head", device="cpu", engine="naive")
    x, y = data("cnn", 16, np.random.default_rng(3))
    params = fast.initial_params()
    probe = MeZOSGD(params, lr=0.01, mu=0.01, directions=3).ask()
    fast.outputs(params, x, y)
    got, want = fast.losses(params, probe, x, y), naive.losses(params, probe, x, y)
    assert fast.paths_taken() == {"prefix": 6} and len(fast.fast_engine().subgraphs.sessions) == 1
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
