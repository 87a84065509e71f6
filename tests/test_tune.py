"""edgezo tune: a real Ray Tune search (Optuna TPE + ASHA) over real edgezo training runs, its outputs, the best
trial reproduced bit for bit by its `edgezo train` command in a fresh process, --resume, and the space's errors."""
import json
import math
import shlex

import pytest

from conftest import run_cli

pytest.importorskip("ray.tune", reason="edgezo[tune] (ray[tune], optuna) is not installed")


@pytest.fixture(scope="module")
def tuned(mlp_artifact, sarcos_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "t"
    # lr up to 1e6 on the SARCOS MLP: some of the (seeded) trials diverge
    proc = run_cli("tune", mlp_artifact, "--data", sarcos_npz, "--val-fraction", "0.25", "--trials", "6",
                   "--steps", "30", "--eval-every", "10", "--space", "lr=1e-2:1e6:log", "--try", "lr=1e5,eps=0.01,gamma=0.9", "--out", out,
                   check=True)
    return out, proc


def test_tune_writes_every_trial_and_the_best(tuned):
    out, proc = tuned
    summary = json.loads((out / "tune.json").read_text())
    best = json.loads((out / "best.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 6 and summary["trials_ok"] == 6
    assert all(set(t["settings"]) == {"lr", "eps", "gamma"} for t in trials)
    assert {"lr": 1e5, "eps": 0.01, "gamma": 0.9} in [t["settings"] for t in trials]  # --try: tried as given
    assert all(t["curve"][0]["step"] == 0 for t in trials)  # every curve starts at the untrained loss
    finite = [t["val_loss"] for t in trials]
    assert best["val_loss"] == min(finite) and best["trial_id"] == trials[0]["trial_id"]
    statuses = {t["status"] for t in trials}
    assert "diverged" in statuses, statuses
    for t in trials:
        if t["status"] == "diverged":  # penalized with its worst finite validation loss, not a made-up number
            assert t["val_loss"] == max(p["val_loss"] for p in t["curve"]) and math.isfinite(t["val_loss"])
        if t["status"] == "finished":
            assert t["curve"][-1]["step"] == 30
    assert (out / "tune.png").stat().st_size > 10_000
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("trial ") for line in lines) == 6  # one line per trial, no Ray status tables
    assert "Trial status" not in proc.stdout and "Configuration for experiment" not in proc.stdout


def test_best_command_reproduces_the_best_trial_bit_for_bit(tuned, tmp_path):
    out, _ = tuned
    best = json.loads((out / "best.json").read_text())
    argv = shlex.split(best["command"])
    assert argv[:2] == ["edgezo", "train"]
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    run_cli(*argv[1:], block_torch=True, check=True)
    evals = json.loads((tmp_path / "again" / "metrics.json").read_text())["evals"]
    trial = next(t for t in json.loads((out / "tune.json").read_text())["trials"] if t["trial_id"] == best["trial_id"])
    assert [e["val_loss"] for e in evals] == [p["val_loss"] for p in trial["curve"]]
    assert evals[-1]["val_loss"] == best["val_loss"]


def test_resume_of_a_finished_tune_runs_nothing_again(tuned):
    out, _ = tuned
    before = json.loads((out / "tune.json").read_text())
    proc = run_cli("tune", "--resume", out, check=True)
    assert "resuming the tune" in proc.stdout and not any(line.startswith("trial ") for line in proc.stdout.splitlines())
    after = json.loads((out / "tune.json").read_text())
    assert sorted(t["trial_id"] for t in after["trials"]) == sorted(t["trial_id"] for t in before["trials"])
    assert after["trials"][0]["val_loss"] == before["trials"][0]["val_loss"]


@pytest.mark.parametrize("space, message", [
    (["lr=1e-4:1e-1:lin"], "a range is LO:HI or LO:HI:log"),
    (["lr=0:1:log"], "a log range needs LO > 0"),
    (["momentum=0.9"], "'momentum' is not a tunable setting"),
    (["mu=1e-3:1e-1"], "--optimizer cocd does not take it"),
    (["budget=1.5,2"], "must be an integer"),
    (["lr"], "is not NAME=SPEC"),
])
def test_bad_spaces_are_refused(space, message):
    from edgezo.runtime.errors import EdgezoError
    from edgezo.tune import TuneSettings
    with pytest.raises(EdgezoError, match=message):
        TuneSettings(base={"optimizer": "cocd"}, out="x", space=space).parsed_space()


def test_a_bad_space_fails_in_one_line_and_writes_nothing(mlp_artifact, sarcos_npz, tmp_path):
    proc = run_cli("tune", mlp_artifact, "--data", sarcos_npz, "--val-fraction", "0.2", "--space", "lr=0:1:log",
                   "--out", tmp_path / "t")
    assert proc.returncode == 2 and "a log range needs LO > 0" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "t").exists()


def test_a_fixed_flag_leaves_the_search_and_a_clash_is_refused(mlp_artifact, sarcos_npz, tmp_path):
    from edgezo.tune import TuneSettings
    base = {"optimizer": "cocd", "gamma": 0.9}
    assert set(TuneSettings(base=base, out="x").parsed_space()) == {"lr", "eps"}
    proc = run_cli("tune", mlp_artifact, "--data", sarcos_npz, "--val-fraction", "0.2", "--gamma", "0.9",
                   "--space", "gamma=0.5:1", "--out", tmp_path / "t")
    assert proc.returncode == 2 and "--gamma is both fixed and in --space" in proc.stderr
    proc = run_cli("tune", mlp_artifact, "--data", sarcos_npz, "--out", tmp_path / "t")
    assert proc.returncode == 2 and "validation data" in proc.stderr


def test_a_try_outside_the_space_or_incomplete_is_refused(mlp_artifact, sarcos_npz, tmp_path):
    for given, why in (("lr=5,eps=0.1,gamma=0.9", "lr=5 is outside --space lr"),
                       ("lr=0.01,eps=0.1", "give gamma too"), ("lr=0.01,mu=1,eps=0.1,gamma=1", "'mu' is not searched")):
        proc = run_cli("tune", mlp_artifact, "--data", sarcos_npz, "--val-fraction", "0.2", "--try", given,
                       "--out", tmp_path / "t")
        assert proc.returncode == 2 and why in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "t").exists()
