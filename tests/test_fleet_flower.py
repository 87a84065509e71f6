"""`edgezo fleet` over Flower for real: the simulation runtime (Ray actors), and a deployment on localhost (a
SuperLink and SuperNode processes, TLS, SuperNode authentication with registered keys, torch blocked on the
devices). Each fleet's params equal the in-process fleet core's (runtime/fleet.py, tested against one process on
the concatenated batches in test_fleet_core.py), and only step numbers, loss vectors and counts travel."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_cli

pytest.importorskip("flwr", reason="the fleet extra (flwr) is not installed")
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"  # no usage events from the tests' Flower processes
from edgezo.runtime import load_artifact  # noqa: E402
from edgezo.runtime.config import FleetConfig  # noqa: E402
from edgezo.runtime.data import load_data  # noqa: E402
from edgezo.runtime.fleet import Aggregator, Device  # noqa: E402
from edgezo.runtime.fleet_flower import partition  # noqa: E402
from edgezo.runtime.run import make_optimizer  # noqa: E402

SETTINGS = ["--batch-size", "32", "--engine", "naive", "--threads", "1"]
DOWN, UP = {"step", "from", "means", "final"}, [{"step", "losses", "rows"}, {"step", "params_sha256"}]


def core_fleet(config, datas, seeds):
    """The same fleet in one process, without Flower: its params after config.steps steps."""
    art = load_artifact(config.artifact, "cpu", threads=1, engine="naive")
    devices = [Device(art, make_optimizer(config, art.initial_params()), d, config.batch_size, seed=s)
               for d, s in zip(datas, seeds)]
    aggregator = Aggregator(len(devices[0].optimizer.ask()), len(devices))
    devices[0].optimizer.discard()
    for step in range(config.steps):
        mean, _ = aggregator.aggregate({k: d.evaluate(step) for k, d in enumerate(devices)})
        for d in devices:
            d.apply(step, mean)
    return devices[0].optimizer.params


def check_messages(run, nodes, rows):
    """Every message the server sent or received: only these keys, and a loss vector's size of bytes."""
    lines = [json.loads(line) for line in (run / "messages.jsonl").read_text().splitlines()]
    assert len({line["node"] for line in lines}) == nodes
    for line in lines:
        assert set(line["keys"]) == DOWN if line["way"] == "down" else set(line["keys"]) in UP, line
    up = [line["bytes"] for line in lines if line["way"] == "up" and "losses" in line["keys"]]
    assert max(up) < 4 * rows + 600  # float32 losses plus Flower's envelope; the params are 4x larger
    return lines


def test_simulation_matches_the_core_and_resumes(mlp_artifact, sarcos_npz, tmp_path):
    run = tmp_path / "fleet"
    flags = ["--optimizer", "cocd", "--lr", "0.01", "--eps", "0.01", "--budget", "16", "--clients", "3"]
    assert run_cli("fleet", "simulate", mlp_artifact, "--data", sarcos_npz, *flags, *SETTINGS, "--steps", "4",
                   "--out", run, check=True).returncode == 0
    resumed = run_cli("fleet", "simulate", "--resume", "--out", run, "--steps", "7", check=True)
    assert "resuming at step 4" in resumed.stdout and "3 of 3 devices hold params identical" in resumed.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 7 and metrics["devices_identical"] == 3 and metrics["left_out"] == []
    config = FleetConfig(artifact=str(mlp_artifact), optimizer="cocd", lr=0.01, eps=0.01, budget=16, steps=7,
                         batch_size=32)
    art = load_artifact(mlp_artifact, "cpu", threads=1)
    data = load_data(sarcos_npz, art.manifest)
    expected = core_fleet(config, [partition(data, k, 3, "iid", 0) for k in range(3)], range(3))
    # the devices' mean is summed in node order, the core's in partition order: float64 rounding, then float32
    np.testing.assert_allclose(np.load(run / "params.npy"), expected, rtol=0, atol=1e-6)
    lines = check_messages(run, 6, 32)  # the resumed run's three devices are new nodes
    # the resumed fleet's devices were new: they caught up from the server's log, 4 means each, no weights
    assert sum(line["bytes"] > 4 * 4 * 32 for line in lines if line["way"] == "down" and line["step"] == 4) == 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, seconds=30):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert proc.poll() is None, "the SuperLink exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port} after {seconds} s")


@pytest.mark.skipif(shutil.which("flower-superlink", path=os.path.dirname(sys.executable)) is None,
                    reason="flower-superlink is not installed beside this Python")
def test_deployment_tls_registered_keys_torch_blocked(mlp_artifact, sarcos_npz, tmp_path):
    """flower-superlink with TLS and --enable-supernode-auth; three registered SuperNodes (torch and Ray blocked in
    their ClientApp processes) train with MeZO; a fourth, with valid TLS but an unregistered key, is refused."""
    bin_ = os.path.dirname(sys.executable)
    assert run_cli("fleet", "keys", tmp_path / "keys", "--devices", "4", check=True).returncode == 0
    keys, port = tmp_path / "keys", free_port()
    blocker = tmp_path / "block"
    blocker.mkdir()
    for name in ("torch", "ray"):  # a device needs neither (edgezo[device,fleet-device])
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is blocked on this device')\n")
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "home"), PATH=bin_ + os.pathsep + os.environ["PATH"])
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text(f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\naddress = '
                                                   f'"127.0.0.1:{port}"\nroot-certificates = "{keys / "ca.crt"}"\n')
    art = load_artifact(mlp_artifact, "cpu", threads=1)
    data = load_data(sarcos_npz, art.manifest)
    for k in range(4):
        np.savez(tmp_path / f"dev{k}.npz", **{n: v[k * 96:(k + 1) * 96] for n, v in data.items()})
    procs = []
    try:
        link = subprocess.Popen(["flower-superlink", "--ssl-ca-certfile", keys / "ca.crt", "--ssl-certfile",
                                 keys / "server.pem", "--ssl-keyfile", keys / "server.key", "--enable-supernode-auth",
                                 "--disable-runtime-dependency-installation", "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        procs.append(link)
        wait_for_port(port, link)
        for k in range(3):
            subprocess.run(["flwr", "supernode", "register", keys / f"device-{k}.pub", "fleet"], env=env, check=True,
                           capture_output=True)
        device_env = dict(env, PYTHONPATH=str(blocker))
        logs = [tmp_path / f"node{k}.log" for k in range(4)]
        for k in range(4):
            procs.append(subprocess.Popen(
                ["flower-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates", keys / "ca.crt",
                 "--auth-supernode-private-key", keys / f"device-{k}", "--port", str(free_port()), "--max-retries", "3",
                 "--node-config", f'artifact="{mlp_artifact}" data="{tmp_path / f"dev{k}.npz"}" seed={k}'],
                env=device_env, stdout=open(logs[k], "w"), stderr=subprocess.STDOUT))
        app, run = tmp_path / "fleetapp", tmp_path / "run"
        flags = ["--optimizer", "mezo", "--lr", "0.01", "--mu", "0.01", "--directions", "4", "--steps", "3",
                 "--clients", "3", "--min-devices", "3", "--round-timeout", "30"]
        assert run_cli("fleet", "app", app, mlp_artifact, *flags, *SETTINGS, "--out", run, check=True).returncode == 0
        done = subprocess.run(["flwr", "run", app, "fleet", "--stream"], env=env, capture_output=True, text=True,
                              timeout=150)
        assert (run / "metrics.json").is_file(), done.stdout[-2000:] + done.stderr[-2000:]
        assert procs[4].wait(timeout=30) != 0  # the unregistered SuperNode gave up
        assert "Failed to activate SuperNode" in logs[3].read_text()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["devices"] == 3 and metrics["devices_identical"] == 3 and metrics["left_out"] == []
    config = FleetConfig(artifact=str(mlp_artifact), optimizer="mezo", lr=0.01, mu=0.01, directions=4, steps=3,
                         batch_size=32)
    expected = core_fleet(config, [load_data(tmp_path / f"dev{k}.npz", art.manifest) for k in range(3)], range(3))
    np.testing.assert_allclose(np.load(run / "params.npy"), expected, rtol=0, atol=1e-6)
    check_messages(run, 3, 8)


def test_bad_fleet_settings_are_one_line_errors(mlp_artifact, sarcos_npz, tmp_path):
    for args, says in ((["--steps", "2", "--clients", "2", "--min-devices", "3"], "--min-devices must be in [1"),
                       (["--clients", "2"], "needs --steps"),
                       (["--steps", "2", "--mu", "0.1"], "--mu does not apply to --optimizer cocd")):
        proc = run_cli("fleet", "simulate", mlp_artifact, "--data", sarcos_npz, *args, "--out", tmp_path / "r")
        assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, args
        assert not (tmp_path / "r").exists()
    proc = run_cli("fleet", "simulate", "--resume", "--out", tmp_path / "none")
    assert proc.returncode == 2 and "--resume needs --out RUN" in proc.stderr
    from edgezo.runtime.errors import EdgezoError
    from edgezo.runtime.fleet_flower import simulate
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "means.f32").write_bytes(b"1234")  # another run's log: never appended to
    with pytest.raises(EdgezoError, match="is not an empty folder"):
        simulate(FleetConfig(artifact=str(mlp_artifact), data=str(sarcos_npz), steps=2, out=str(tmp_path / "used")))
    assert (tmp_path / "used" / "means.f32").read_bytes() == b"1234"
