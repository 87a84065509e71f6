"""The deployed transformer test model in static per-channel QDQ int8 (quant_pre_process, then quantize_static, as
benchmarks/lowprec_speed.py makes it), trained on its weight scales (--scales): every step's losses equal the naive
path's within int8 rounding, across the whole coordinate cycle; the two ways the engine saves work give what the
plain way gives: the fanout (calls side by side, runtime/engine/fanout.py) the losses of one call, and the MatMul
column copies the op's own output per perturbation."""
import numpy as np
import pytest

import deployed  # benchmarks/deployed.py (conftest puts benchmarks/ on the path)
from edgezo.exporters.onnx_import import export_onnx
from edgezo.runtime import load_artifact
from edgezo.runtime.engine.op_copies import matmul_copies, op_copies, weight_side_matmul
from edgezo.runtime.optim import CoCD

# A step's loss from the engine and from the naive path may differ by one activation rounding: the naive loss graph
# runs onnxruntime's fused int8 kernels (QLinearMatMul: integer sums), the engine's copies float MatMuls, and a value
# on a rounding tie lands one quantization step apart now and then (up to 1.3e-4 relative measured on the
# 64-wide model, 0 on most steps). float32 paths are held to 1e-5 (test_engine_deployed.py).
INT8_RTOL = 5e-4


@pytest.fixture(scope="module")
def transformer_int8(tmp_path_factory):
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from edgezo.exporters.quantize import quantize_static_int8
    folder = tmp_path_factory.mktemp("transformer_int8")
    shape = deployed.export("transformer", folder / "fp32.onnx", d=32, ff=64, seq=8, features=8)
    quant_pre_process(str(folder / "fp32.onnx"), str(folder / "pre.onnx"))  # weights stay initializers
    rng = np.random.default_rng(0)
    quantize_static_int8(folder / "pre.onnx", folder / "int8.onnx",
                         [{"x": rng.standard_normal((16, *shape)).astype(np.float32)} for _ in range(4)])
    art = export_onnx(folder / "int8.onnx", folder / "scales", "cross_entropy", scales=True, log=lambda line: None)
    x, y = rng.standard_normal((32, *shape)).astype(np.float32), rng.integers(0, 10, 32)
    return art, {"x": x, "target": y}


def probes_across_cycle(params, budget, steps):
    opt = CoCD(params, lr=0.0, eps=0.05, budget=budget)
    cycle = -(-params.size // budget)
    for step in np.linspace(0, cycle - 1, steps).astype(int):
        opt.refreshed = int(step) * budget
        yield opt.ask()
        opt.discard()


def test_scales_steps_equal_naive_within_int8_rounding(transformer_int8):
    art, feed = transformer_int8
    fast, naive = load_artifact(art, "cpu", threads=2), load_artifact(art, "cpu", engine="naive")
    params = fast.initial_params()
    for probe in probes_across_cycle(params, 16, 12):
        a, b = fast.losses(params, probe, feed, feed), naive.losses(params, probe, feed, feed)
        assert np.allclose(a, b, rtol=INT8_RTOL, atol=0), np.max(np.abs(a - b) / np.abs(b))
    assert fast.paths_taken().get("op-stacked", 0) > 0 and "naive" not in fast.paths_taken()
    engine = fast.fast_engine()
    assert engine.fan.workers == 2
    assert any(weight_side_matmul(engine, op) for op in engine.ops if op.params)


def test_fanout_and_matmul_columns_give_what_the_plain_calls_give(transformer_int8, monkeypatch):
    from edgezo.runtime.engine import fanout
    monkeypatch.setattr(fanout, "SIDE_BY_SIDE_BYTES", 0)  # this small model's calls would run whole
    art, feed = transformer_int8
    fanned, single = load_artifact(art, "cpu", threads=2), load_artifact(art, "cpu", threads=2)
    single.fast_engine().fan.workers = 1
    params = fanned.initial_params()
    for probe in probes_across_cycle(params, 16, 6):
        a, b = fanned.losses(params, probe, feed, feed), single.losses(params, probe, feed, feed)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    engine = fanned.fast_engine()
    x, a0 = params, feed["x"]
    for j, op in enumerate(engine.ops):
        if not (op.params and weight_side_matmul(engine, op)):
            continue
        acts = engine.base(x, a0, [j])
        entry = next(iter(op.params.values()))
        index = entry["offset"] + np.array([0, entry["size"] - 1, 0])
        delta = np.array([0.05, -0.05, -0.05], np.float32)
        rows = np.arange(3)
        columns = matmul_copies(engine, op, x, acts, index, delta)(rows)
        whole = op_copies(engine, op, x, acts, index, delta, columns=False)(rows)  # onnxruntime runs the op alone
        np.testing.assert_allclose(columns, whole, rtol=1e-5, atol=1e-6)
        assert not np.array_equal(columns[0], acts[op.output]) and not np.array_equal(columns[0], columns[1])


def test_direction_probes_side_by_side_equal_one_call(transformer_int8, monkeypatch):
    """MeZO's rows (the frozen part once, the int8 head once per row) split between the fanout's threads."""
    from edgezo.runtime.engine import fanout
    from edgezo.runtime.optim import MeZOSGD
    monkeypatch.setattr(fanout, "SIDE_BY_SIDE_BYTES", 0)
    art, feed = transformer_int8
    head = export_onnx(art.parent / "int8.onnx", art.parent / "head", "cross_entropy", last_layers=1,
                       log=lambda line: None)
    fanned, single = load_artifact(head, "cpu", threads=2), load_artifact(head, "cpu", threads=2)
    single.fast_engine().fan.workers = 1
    probe = MeZOSGD(fanned.initial_params(), lr=0.01, mu=0.01, directions=5, seed=1).ask()
    a = fanned.losses(fanned.initial_params(), probe, feed, feed)
    b = single.losses(single.initial_params(), probe, feed, feed)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    assert fanned.paths_taken() == {"prefix": len(probe)}
