import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the models only tests and benchmarks use (deployed.py)
SHARED = ROOT / ".." / "shared"
DATASETS = SHARED / "datasets"

# Block torch in a child process: `import torch` then raises ImportError.
NO_TORCH = "import sys; sys.modules['torch'] = None; "


def run_cli(*args, block_torch=False, check=False):
    """Run the edgezo CLI in a fresh interpreter; returns CompletedProcess with text output."""
    code = ("import sys; sys.modules['torch'] = None; " if block_torch else "import sys; ") + \
        "from edgezo.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgezo {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def mlp_artifact(tmp_path_factory):
    import torch
    from edgezo.exporters import export_module
    from edgezo.exporters.models import sarcos_mlp
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("art") / "mlp"
    export_module(sarcos_mlp(), torch.randn(4, 21), torch.randn(4, 7), "mse", path)
    return path


@pytest.fixture(scope="session")
def cnn_artifact(tmp_path_factory):
    import torch
    from edgezo.exporters import export_module
    from edgezo.exporters.models import mnist_cnn
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("art") / "cnn"
    export_module(mnist_cnn(), torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)), "cross_entropy", path)
    return path


@pytest.fixture(scope="session")
def sarcos_npz(tmp_path_factory):
    """The SARCOS test split from ../shared as a small standardized .npz (x, y)."""
    import numpy as np
    from edgezo.runtime.data import load_sarcos
    x, y = load_sarcos(DATASETS / "sarcos" / "sarcos_inv_test.mat")
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean(0)) / y.std(0)
    path = tmp_path_factory.mktemp("data") / "sarcos.npz"
    np.savez(path, x=x[:1024], y=y[:1024])
    return path


def assert_fast_equals_naive(fast, naive, feed, budget, steps, rtol):
    """CoCD steps whose every loss from the artifact's fast path equals the naive path's within rtol (relative)."""
    import numpy as np
    from edgezo.runtime import CoCD
    params = fast.initial_params()
    opt = CoCD(params.copy(), lr=0.1, eps=0.05, budget=budget)
    for _ in range(steps):
        probe = opt.ask()
        a, b = fast.losses(params, probe, feed, feed), naive.naive_losses(params, probe, feed)
        assert np.allclose(a, b, rtol=rtol, atol=0), np.max(np.abs(a - b) / np.abs(b))
        opt.tell(b)
