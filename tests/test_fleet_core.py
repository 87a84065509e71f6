"""runtime/fleet.py, the fleet's torch-free core (Flower carries its messages; here the devices and the server's
aggregator meet in one process): K devices equal one process on the concatenated batches, a device that missed
steps catches up bit-identically from the server's log, bad answers are left out with a reason."""
import numpy as np
import pytest

from edgezo.runtime import load_artifact
from edgezo.runtime.data import load_data, num_rows, take
from edgezo.runtime.errors import EdgezoError
from edgezo.runtime.fleet import Aggregator, Device
from edgezo.runtime.optim import CoCD, MeZOSGD

K, BATCH, STEPS = 3, 32, 12


def optimizer(kind, params):
    if kind == "cocd":
        return CoCD(params.copy(), lr=0.01, eps=0.01, budget=16, gamma=0.9)
    return MeZOSGD(params.copy(), lr=0.01, mu=1e-2, directions=4, seed=3)


def fleet(art, data, kind):
    params = art.initial_params()
    rows = num_rows(data) // K
    return [Device(art, optimizer(kind, params), take(data, slice(k * rows, (k + 1) * rows)), BATCH, seed=k)
            for k in range(K)]


def round_(devices, aggregator, step, skip=()):
    answers = {k: d.evaluate(step) for k, d in enumerate(devices) if k not in skip}
    mean, left_out = aggregator.aggregate(answers)
    for k, d in enumerate(devices):
        if k not in skip:
            d.apply(step, mean)
    return left_out


@pytest.mark.parametrize("kind", ["cocd", "mezo"])
def test_k_devices_equal_one_process_on_the_concatenated_batches(mlp_artifact, sarcos_npz, kind):
    art = load_artifact(mlp_artifact, "cpu", threads=1)
    data = load_data(sarcos_npz, art.manifest)
    devices = fleet(art, data, kind)
    single = optimizer(kind, art.initial_params())
    aggregator = Aggregator(len(optimizer(kind, art.initial_params()).ask()), min_devices=K)
    for step in range(STEPS):
        batches = [d.batch(step) for d in devices]
        whole = {n: np.concatenate([b[n] for b in batches]) for n in batches[0]}
        probe = single.ask()
        single.tell(art.losses(single.params, probe, {n: whole[n] for n in art.input_names},
                               {n: whole[n] for n in art.target_names}))
        assert round_(devices, aggregator, step) == {}
    for d in devices[1:]:  # every device holds the same params, bit for bit
        assert np.array_equal(d.optimizer.params, devices[0].optimizer.params)
    # float32 means of 96 rows in onnxruntime vs the float64 mean of three 32-row means: rounding only, ~2e-7 of
    # a loss, amplified by lr / (2 eps or 2 mu) per step and summed over the steps: 1e-5 after 12 steps
    np.testing.assert_allclose(devices[0].optimizer.params, single.params, rtol=1e-5, atol=1e-5)


def test_a_device_that_missed_rounds_catches_up_bit_identically(mlp_artifact, sarcos_npz):
    art = load_artifact(mlp_artifact, "cpu", threads=1)
    devices = fleet(art, load_data(sarcos_npz, art.manifest), "cocd")
    aggregator = Aggregator(32, min_devices=2)
    for step in range(STEPS):
        round_(devices, aggregator, step, skip={2} if 3 <= step < 9 else ())
        if step == 8:  # back after 6 missed rounds: replays the log, without weights
            with pytest.raises(EdgezoError, match="catch up"):
                devices[2].evaluate(step + 1)
            devices[2].catch_up(aggregator.log)
    assert all(np.array_equal(d.optimizer.params, devices[0].optimizer.params) for d in devices)
    late = Device(art, optimizer("cocd", art.initial_params()), devices[0].data, BATCH)
    late.catch_up(aggregator.log)  # joins at the end
    assert late.step == STEPS and np.array_equal(late.optimizer.params, devices[0].optimizer.params)


def test_bad_answers_are_left_out_with_a_reason_and_change_nothing():
    agg = Aggregator(4, min_devices=2)
    good = (np.ones(4), 8)
    mean, left_out = agg.aggregate({"a": good, "b": (np.full(4, 3.0), 24), "c": (np.ones(5), 8),
                                    "d": (np.array([1, np.nan, 1, 1]), 8), "e": "timed out", "f": (np.ones(4), 0)})
    np.testing.assert_allclose(mean, np.full(4, 2.5))  # sample-weighted: (8 * 1 + 24 * 3) / 32
    assert set(left_out) == {"c", "d", "e", "f"} and "expected 4" in left_out["c"]
    assert "non-finite" in left_out["d"] and left_out["e"] == "timed out"
    with pytest.raises(EdgezoError, match="min-devices is 2"):
        agg.aggregate({"a": good, "c": (np.ones(5), 8)})
    assert agg.step == 1  # the failed round left the log as it was


def test_a_device_restored_mid_step_asks_the_same_probe(mlp_artifact, sarcos_npz):
    """A device's state is saved with a probe pending (Flower ends its process after each message): restored, it
    asks the same probe, also for MeZO, whose ask() draws the step's seeds."""
    art = load_artifact(mlp_artifact, "cpu", threads=1)
    device = fleet(art, load_data(sarcos_npz, art.manifest), "mezo")[0]
    losses, _ = device.evaluate(0)
    device.apply(0, losses)
    device.evaluate(1)
    restored = Device(art, optimizer("mezo", art.initial_params()), device.data, BATCH)
    restored.optimizer.params[:] = device.optimizer.params
    restored.optimizer.load_state_dict(device.state_dict())
    np.testing.assert_array_equal(restored.evaluate(1)[0], device.evaluate(1)[0])
