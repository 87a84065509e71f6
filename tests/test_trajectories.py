"""Today's trajectories are bit-identical to those recorded before the refactor (tests/trajectories.py, recorded
with commit 5af24f5's code): every optimizer through run.train, the engine (auto and naive), CoCD's memory window,
weight decay and one-sided differences. cnn-cocd re-recorded once since: the engine's chunk of copies now takes
half of --engine-memory-mb (the rest is for its sessions), which moved one parameter by 1 ulp (7e-9)."""
from pathlib import Path

import numpy as np
import pytest

from trajectories import RUNS, run_all

RECORDED = Path(__file__).parent / "data" / "trajectories.npz"


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    return run_all(tmp_path_factory.mktemp("trajectories"))


@pytest.mark.parametrize("name", list(RUNS))
def test_trajectory_is_bit_identical(replayed, name):
    recorded = np.load(RECORDED)
    for key in (f"{name}/params", f"{name}/losses"):
        assert replayed[key].dtype == recorded[key].dtype and replayed[key].shape == recorded[key].shape, key
        diff = np.flatnonzero(replayed[key] != recorded[key])
        assert diff.size == 0, f"{key}: {diff.size} values differ, first at {diff[0]} " \
                               f"({replayed[key].flat[diff[0]]!r} vs {recorded[key].flat[diff[0]]!r})"


@pytest.mark.parametrize("name", ["mlp-cocd", "mlp-mezo", "mlp-cge"])
def test_checkpoints_written_before_the_change_resume_bit_identically(tmp_path, name):
    """config.json (version 1: every flag, the ones its optimizer ignored too) and checkpoint.npz (optimizer
    settings and state in one flat dict) as 5af24f5 wrote them at step 14 of 16; resumed with this tree's code,
    the run ends on the recorded trajectory."""
    import json
    import shutil
    from trajectories import artifacts, datasets
    from edgezo.runtime import run
    data, arts = datasets(tmp_path), artifacts(tmp_path)
    folder = tmp_path / "run"
    shutil.copytree(RECORDED.parent / "legacy" / name, folder)
    config = json.loads((folder / "config.json").read_text())
    assert "config_version" not in config and "eps" in config  # the old format, as written
    config.update(artifact=str(arts["mlp"]), data=str(data["mlp"]), out=str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    lines = []
    metrics = run.resume(folder, log=lines.append)
    assert metrics["steps"] == 16 and metrics["resumed"] and "resuming at epoch 2, batch 6 (step 14)" in lines
    assert np.array_equal(np.load(folder / "params.npy"), np.load(RECORDED)[f"{name}/params"])
