"""The run config: every optimizer honours each hyperparameter flag it takes and refuses the others with one
line that changes nothing; the CLI's flags are the config's fields."""
import numpy as np
import pytest

from conftest import run_cli
from edgezo.runtime.config import HYPER, OPTIMIZERS, TAKES, RunConfig
from edgezo.runtime.errors import EdgezoError
from edgezo.runtime.run import make_optimizer
from edgezo.runtime.probes import perturbed

OTHER = {"lr": 0.3, "eps": 0.2, "budget": 3, "memory": "0.5", "gamma": 0.5, "weight_decay": 0.5, "one_sided": True,
         "mu": 0.05, "directions": 3}


def trajectory(config, steps=4):
    """Params after a few steps on a fixed quadratic, through the optimizer the config makes."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 40))
    a = a @ a.T / 40 + np.eye(40)
    opt = make_optimizer(config.check(), np.ones(40, np.float32))
    for _ in range(steps):
        probe = opt.ask()
        opt.tell([0.5 * x @ a @ x for x in (perturbed(opt.params, probe, p) for p in range(len(probe)))])
    return opt.params.copy()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_flag_is_honoured_or_refused(optimizer):
    assert set(OTHER) == set(HYPER)
    start = {"lr": 0.05, **({"budget": 8} if "budget" in TAKES[optimizer] else {})}
    if optimizer == "bccd":  # with gamma 0 the buffer's size shows only in which coordinates decay
        start["weight_decay"] = 0.1
    base = trajectory(RunConfig(optimizer=optimizer, **start))
    for key, value in OTHER.items():
        config = RunConfig(optimizer=optimizer, **dict(start, **{key: value}))
        if key in TAKES[optimizer]:
            assert not np.array_equal(trajectory(config), base), f"{optimizer} ignores {key}"
        else:
            with pytest.raises(EdgezoError, match=f"--{key.replace('_', '-')} does not apply to --optimizer "
                                                  f"{optimizer}"):
                config.check()


def test_a_refused_flag_exits_2_and_writes_nothing(mlp_artifact, sarcos_npz, tmp_path):
    result = run_cli("train", mlp_artifact, "--data", sarcos_npz, "--optimizer", "mezo", "--weight-decay", "0.1",
                     "--eps", "0.1", "--out", tmp_path / "run")
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    assert result.stderr.strip() == "edgezo: error: --eps does not apply to --optimizer mezo; it takes --lr, --mu, " \
                                    "--directions, --weight-decay"
    result = run_cli("train", "--resume", tmp_path, "--lr", "0.1")
    assert result.returncode == 2 and "--lr does not apply" in result.stderr


def test_cli_flags_are_the_config_fields():
    from dataclasses import fields
    from edgezo.cli import build_parser
    args = build_parser().parse_args(["train", "art"])
    for f in fields(RunConfig):
        if not f.metadata.get("internal") and f.name != "artifact":
            assert getattr(args, f.name) == f.default, f.name
