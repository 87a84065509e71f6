"""Zeroth-order baselines: each estimator's mean matches the true gradient of a quadratic."""
import numpy as np
import pytest

from edgezo.runtime.errors import EdgezoError
from edgezo.runtime.optim import CGE, SPSA, ZOSGD, MeZOSGD, perturbed

N = 6
A = np.diag(np.arange(1.0, N + 1))
B = np.linspace(-1, 1, N)


def f(x):
    return 0.5 * x @ A @ x - B @ x


def estimate(opt):
    """The step's gradient estimate, recovered from the update with lr = 1."""
    before = opt.params.copy()
    probe = opt.ask()
    opt.tell([f(perturbed(opt.params, probe, p)) for p in range(len(probe))])
    estimate = before - opt.params
    opt.params[:] = before
    return estimate


@pytest.mark.parametrize("make, trials, tol", [
    (lambda x: SPSA(x, lr=1.0, mu=1e-3, directions=4, seed=1), 4000, 0.1),
    (lambda x: MeZOSGD(x, lr=1.0, mu=1e-3, directions=4, seed=2), 4000, 0.15),
    (lambda x: ZOSGD(x, lr=1.0, mu=1e-4, directions=4, seed=3), 4000, 0.15),
])
def test_directional_estimators_are_unbiased(make, trials, tol):
    x = np.linspace(0.5, -0.5, N)
    true = A @ x - B
    opt = make(x)
    mean = np.mean([estimate(opt) for _ in range(trials)], axis=0)
    # relative error of the Monte-Carlo mean, stated tolerance (seeded, so the test is deterministic)
    assert np.linalg.norm(mean - true) <= tol * np.linalg.norm(true)


def test_cge_is_the_one_sided_gradient():
    x = np.linspace(0.5, -0.5, N)
    opt = CGE(x, lr=1.0, mu=1e-6)
    probe = opt.ask()
    assert probe.index.tolist() == [0] + list(range(N)) and probe.delta[0] == 0
    opt.tell([f(perturbed(x, probe, p)) for p in range(len(probe))])
    assert np.allclose(np.linspace(0.5, -0.5, N) - x, A @ np.linspace(0.5, -0.5, N) - B, atol=1e-5)


def test_mezo_keeps_nothing_n_sized_between_ask_and_tell():
    opt = MeZOSGD(np.zeros(1000), lr=0.1, directions=2)
    probe = opt.ask()
    arrays = [v for v in vars(opt).values() if isinstance(v, np.ndarray) and v is not opt.params]
    assert all(a.size < 1000 for a in arrays) and probe.seeds.size == 4


def test_state_dict_round_trip_replays_the_same_directions():
    a = SPSA(np.ones(N), lr=0.1, directions=2, seed=7)
    estimate(a)
    b = SPSA(np.ones(N), lr=0.1, directions=2, seed=99)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.ask().seeds, b.ask().seeds)


@pytest.mark.parametrize("make", [lambda: SPSA(np.zeros(3), lr=0.1, mu=0), lambda: ZOSGD(np.zeros(3), lr=0.1, directions=0),
                                  lambda: CGE(np.zeros(3), lr=0.1, budget=4)])
def test_bad_arguments(make):
    with pytest.raises(EdgezoError):
        make()


@pytest.mark.parametrize("name", ["spsa", "zosgd", "mezo", "cge"])
def test_cli_trains_each_baseline_without_torch(name, mlp_artifact, sarcos_npz, tmp_path):
    import json
    from conftest import run_cli
    own = ["--budget", "16"] if name == "cge" else ["--directions", "2"]  # each takes only its own flags
    run_cli("train", mlp_artifact, "--data", sarcos_npz, "--optimizer", name, *own, "--mu", "1e-2",
            "--batch-size", "256", "--epochs", "1", "--out", tmp_path / "run", block_torch=True, check=True)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["settings"]["type"].lower().startswith(name[:3])
