import numpy as np
import pytest

from edgezo.runtime.errors import EdgezoError
from edgezo.runtime import optim
from edgezo.runtime.optim import BCCD, CoCD, perturbed


def quadratic(n=20, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    A = A @ A.T / n + np.eye(n)
    b = rng.standard_normal(n)
    return lambda x: 0.5 * x @ A @ x - b @ x


def run(opt, f, steps):
    for _ in range(steps):
        probe = opt.ask()
        opt.tell([f(perturbed(opt.params, probe, p)) for p in range(len(probe))])


def test_central_probe_layout():
    x = np.zeros(10, np.float32)
    opt = CoCD(x, lr=0.1, eps=0.5, budget=4)
    opt.refreshed = 8
    probe = opt.ask()
    assert probe.index.dtype == np.int64 and probe.delta.dtype == np.float32
    assert probe.index.tolist() == [8, 9, 0, 1, 8, 9, 0, 1]  # wraps from the last coordinate to the first
    assert probe.delta.tolist() == [0.5] * 4 + [-0.5] * 4


def test_one_sided_probe_layout():
    opt = CoCD(np.zeros(10), lr=0.1, eps=0.5, budget=3, central=False)
    probe = opt.ask()
    assert probe.index.tolist() == [0, 0, 1, 2] and probe.delta.tolist() == [0, 0.5, 0.5, 0.5]


def test_cocd_descends_and_bccd_is_gamma_zero():
    f = quadratic()
    x = np.ones(20)
    opt = CoCD(x, lr=0.05, eps=1e-3, budget=5, gamma=0.9)
    start = f(x)
    run(opt, f, 200)
    assert f(x) < 0.5 * start
    assert BCCD(np.ones(20), lr=0.1, eps=0.1, budget=3).gamma == 0.0


def test_state_dict_round_trip_is_exact():
    f = quadratic()
    a = CoCD(np.ones(20), lr=0.05, eps=1e-2, budget=7, memory=9, gamma=0.95, weight_decay=1e-3)
    run(a, f, 5)
    state = a.state_dict()
    b = CoCD(a.params.copy(), lr=0.05, eps=1e-2, budget=7, memory=9, gamma=0.95, weight_decay=1e-3)
    b.load_state_dict(state)
    run(a, f, 6)
    run(b, f, 6)
    assert np.array_equal(a.params, b.params) and np.array_equal(a.buffer, b.buffer)
    assert set(state) == {"type", "steps", "settings", "state"}  # hyperparameters apart from what tell() changes
    assert state["settings"] == dict(lr=0.05, eps=1e-2, budget=7, memory=9, gamma=0.95, weight_decay=1e-3, central=True)
    assert all(isinstance(v, (int, float, bool, str, np.ndarray)) for v in (*state["settings"].values(),
                                                                            *state["state"].values()))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(budget=0), "budget"), (dict(budget=-3), "budget"), (dict(budget=2.5), "budget"),
    (dict(eps=0.0), "eps"), (dict(eps=-1e-3), "eps"), (dict(eps=float("nan")), "eps"),
    (dict(memory=0), "memory"), (dict(memory=11), "memory"),
    (dict(gamma=-0.1), "gamma"), (dict(gamma=1.5), "gamma"), (dict(lr=-1.0), "lr"),
    (dict(init_buffer=np.zeros(3)), "init_buffer"),
])
def test_bad_arguments_name_the_argument(kwargs, needle):
    settings = dict(lr=0.1, eps=0.1, budget=2)
    settings.update(kwargs)
    with pytest.raises(EdgezoError, match=needle):
        CoCD(np.zeros(10), **settings)


@pytest.mark.parametrize("params", [np.zeros((2, 5)), np.arange(10), [0.0, 1.0], np.zeros(0)])
def test_bad_params(params):
    with pytest.raises(EdgezoError, match="params"):
        CoCD(params, lr=0.1, eps=0.1, budget=2)


def test_bad_tell_changes_nothing():
    x = np.ones(10)
    opt = CoCD(x, lr=0.1, eps=0.1, budget=2)
    with pytest.raises(EdgezoError, match="without a pending ask"):
        opt.tell([1.0] * 4)
    probe = opt.ask()
    with pytest.raises(EdgezoError, match="ask\\(\\) called twice"):
        opt.ask()
    before = (x.copy(), opt.buffer.copy(), opt.refreshed)
    for losses in ([1.0] * 3, [1.0, 2.0, np.nan, 1.0], [1.0, np.inf, 0.0, 0.0]):
        with pytest.raises(EdgezoError, match="losses"):
            opt.tell(losses)
        assert np.array_equal(x, before[0]) and np.array_equal(opt.buffer, before[1])
        assert opt.refreshed == before[2]
    opt.tell([2.0, 1.0, 1.0, 2.0])  # the probe is still pending and can be told
    assert opt.refreshed == 2 and len(probe) == 4


def test_settings_are_replaced_never_edited():
    opt = CoCD(np.ones(20), lr=0.05, eps=1e-2, budget=4, gamma=0.9)
    before, buffer = opt.settings, opt.buffer
    opt.lr = 0.01  # shorthand for replacing the settings object
    assert opt.settings is not before and before.lr == 0.05 and opt.settings.lr == 0.01 and opt.lr == 0.01
    assert opt.buffer is buffer and opt.settings.gamma == 0.9
    with pytest.raises(EdgezoError, match="gamma"):
        opt.gamma = 2.0
    assert opt.settings.gamma == 0.9


def test_old_flat_state_dicts_load():
    a = CoCD(np.ones(20), lr=0.05, eps=1e-2, budget=7, memory=9, gamma=0.95)
    run(a, quadratic(), 3)
    new = a.state_dict()
    flat = {"type": "CoCD", "steps": new["steps"], **new["settings"], **new["state"]}  # as written before
    b = CoCD(a.params.copy(), lr=1.0, eps=1.0, budget=7, memory=9)
    b.load_state_dict(flat)
    assert b.settings == a.settings and b.refreshed == a.refreshed and np.array_equal(b.buffer, a.buffer)


@pytest.mark.parametrize("kind", [optim.SPSA, optim.ZOSGD, optim.MeZOSGD])
def test_discard_forgets_the_probe_and_its_seeds(kind):
    """discard() is as if ask() was never called: the next ask() draws the same seeds (a fleet's server counts a
    probe's rows this way; a device saved with a pending probe restores to the same one)."""
    opt = kind(np.zeros(5, np.float32), lr=0.1, mu=0.01, directions=3, seed=7)
    first = opt.ask()
    opt.discard()
    np.testing.assert_array_equal(opt.ask().seeds, first.seeds)
