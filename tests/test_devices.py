"""Device detection, profiles, the planner against measured peaks, the profiler, CUDA where present."""
import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from conftest import run_cli
from edgezo.devices import providers_for
from edgezo.devices.detect import PROFILES, describe
from edgezo.devices.plan import Planner, measure, target_limit_mb
from edgezo.runtime import EdgezoError, load_artifact

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_describe_this_machine():
    info = describe()
    assert info["kind"] in ("cpu", "cuda", "jetson") and info["memory_mb"] > 0 and info["cores"] >= 1
    assert "CPUExecutionProvider" in info["providers"]


def test_profiles_and_limits():
    for name in ("jetson-nano-4gb", "xavier-nx", "orin-nano-4gb", "orin-nano-8gb", "orin-nx-8gb", "orin-nx-16gb",
                 "agx-orin-32gb", "agx-orin-64gb"):
        assert name in PROFILES
    assert target_limit_mb("orin-nano-8gb") < 8192 and target_limit_mb("x", memory_limit_mb=300) == 300
    with pytest.raises(EdgezoError, match="--target must be"):
        target_limit_mb("raspberry")


@pytest.mark.skipif(HAS_CUDA, reason="this check is for machines without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(EdgezoError, match="no CUDAExecutionProvider"):
        providers_for("cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDAExecutionProvider in this onnxruntime (CPU-only machine)")
def test_cuda_losses_equal_cpu(mlp_artifact):
    from edgezo.runtime.optim import CoCD
    gpu, cpu = load_artifact(mlp_artifact, device="cuda"), load_artifact(mlp_artifact, device="cpu", engine="naive")
    assert gpu.device == "cuda"
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 21)).astype(np.float32), rng.standard_normal((32, 7)).astype(np.float32)
    params = cpu.initial_params()
    probe = CoCD(params, lr=0, eps=0.1, budget=8).ask()
    assert np.allclose(gpu.losses(params, probe, x, y), cpu.losses(params, probe, x, y), rtol=1e-4)


@pytest.mark.alone
@pytest.mark.parametrize("fixture, limit", [("mlp_artifact", 120), ("cnn_artifact", 160)])
def test_planned_peak_matches_the_measured_one(request, fixture, limit):
    path = request.getfixturevalue(fixture)
    planner = Planner(path, budget=64)
    plan = planner.plan(limit)
    assert plan["predicted_peak_mb"] <= limit
    measured = measure(path, plan["batch_size"], 64, plan["engine_memory_mb"], steps=3)
    assert abs(plan["predicted_peak_mb"] - measured["peak_rss_mb"]) <= 0.15 * measured["peak_rss_mb"], \
        (plan, measured["peak_rss_mb"])


def test_plan_cli_and_nothing_fits(mlp_artifact, tmp_path):
    proc = run_cli("plan", mlp_artifact, "--target", "orin-nano-4gb", "--out", tmp_path / "plan.json", check=True)
    assert "--batch-size 1024" in proc.stdout
    assert json.loads((tmp_path / "plan.json").read_text())["predicted_peak_mb"] < 4096
    proc = run_cli("plan", mlp_artifact, "--memory-limit-mb", "20")
    assert proc.returncode == 2 and "nothing fits in 20 MiB" in proc.stderr


def test_profile_writes_table_json_and_png(mlp_artifact, tmp_path):
    proc = run_cli("profile", mlp_artifact, "--batch-size", "32", "--steps", "2", "--budget", "8", "--out",
                   tmp_path / "p", check=True)
    report = json.loads((tmp_path / "p" / "profile.json").read_text())
    measured = report["measured"]
    assert set(measured) == {"inference", "edgezo CoCD m=n", "edgezo CoCD m=n/4", "torch CoCD (reference)",
                             "torch SGD", "torch SGD momentum", "torch Adam"}
    assert all("error" not in r and r["peak_rss_mb"] >= r["baseline_mb"] > 0 for r in measured.values())
    assert measured["edgezo CoCD m=n"]["torch_imported"] is False and measured["torch Adam"]["torch_imported"]
    assert report["analytic_mb"]["torch Adam"]["optimizer state"] == pytest.approx(2 * 4 * 12039 / 2 ** 20)
    assert (tmp_path / "p" / "profile.png").stat().st_size > 10_000 and "torch Adam" in proc.stdout


ORIN_MEMINFO = """MemTotal:        7620480 kB
MemFree:          412772 kB
MemAvailable:    3512940 kB
Buffers:           51324 kB
Cached:          2911304 kB
SwapCached:            0 kB
Active:          2290220 kB
NvMapMemFree:      70660 kB
NvMapMemUsed:    1214828 kB
CmaTotal:         524288 kB
CmaFree:          510832 kB
HugePages_Total:       0
"""


def test_jetson_meminfo_parser_on_a_recorded_orin_sample():
    from edgezo.devices.detect import meminfo_mb, nvmap_used_mb, parse_meminfo
    values = parse_meminfo(ORIN_MEMINFO)
    assert values["MemAvailable"] == 3512940 / 1024 and values["HugePages_Total"] == 0
    assert nvmap_used_mb(ORIN_MEMINFO) == 1214828 / 1024
    assert meminfo_mb("MemTotal", ORIN_MEMINFO) == 7620480 / 1024
    desktop = "\n".join(line for line in ORIN_MEMINFO.splitlines() if not line.startswith("NvMap"))
    assert nvmap_used_mb(desktop) is None


def test_sessions_from_a_model_proto_keep_no_copy_of_its_bytes():
    """The engine's cuts are sessions made from ModelProtos: each may hold onnxruntime's copies of its weights (here
    the initializer and MatMul's prepacked one), not also the serialized model. 12 sessions of a 16 MiB model rose
    368 MiB, 528 MiB with the bytes kept."""
    script = """
import numpy as np, onnx
from onnx import helper, numpy_helper, TensorProto
from edgezo.runtime.sessions import make_session
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
w = numpy_helper.from_array(np.random.default_rng(0).random((2048, 2048), dtype=np.float32), "W")
graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2048])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2048])], [w])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
make_session(model, "cpu", 1)
before = rss()
sessions = [make_session(model, "cpu", 1, arena=False) for _ in range(12)]
print(rss() - before)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    rise = float(out.stdout.split()[-1])
    assert 12 * 16 < rise < 12 * 16 * 2.6, rise
