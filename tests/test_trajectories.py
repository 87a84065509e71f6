"""Today's trajectories are bit-identical to those recorded before the refactor (tests/trajectories.py, recorded
with commit 5af24f5's code): every optimizer through run.train, the engine (auto and naive), CoCD's memory window,
weight decay and one-sided differences."""
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
