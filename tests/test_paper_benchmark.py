"""benchmarks/paper.py: result naming, the paper-step arithmetic, and one real SARCOS epoch end to end."""
import argparse
import json
import math
import sys

import pytest

from conftest import DATASETS, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import paper  # noqa: E402


def names(**overrides):
    args = argparse.Namespace(optimizers=list(paper.OPTIMIZERS), gamma=None, standardize=False,
                              ablate=list(paper.ABLATE_DEFAULT), model="mnist-cnn", seeds=[0])
    vars(args).update(overrides)
    return args


def test_result_names_say_what_differs_from_the_default_run():
    assert paper.result_name(names(), "sarcos", False) == "paper_sarcos"
    assert paper.result_name(names(), "sarcos", True) == "paper_sarcos_paper_steps"
    assert paper.result_name(names(optimizers=["cocd"], gamma=0.95), "mnist", False) == "paper_mnist_cocd_gamma0.95"
    assert paper.result_name(names(standardize=True), "fashion", False) == "paper_fashion_std"
    assert paper.result_name(names(ablate=["M", "M-lr"]), "ablations", True) == "paper_ablations_paper_steps_M_M-lr"
    assert paper.result_name(names(ablate=["M", "M-lr"], gamma=0.9), "ablations", False) == "paper_ablations_M_M-lr"
    paper_cnn = names(model="paper-cnn", optimizers=["cocd"], seeds=[1])
    assert paper.result_name(paper_cnn, "mnist", False) == "paper_mnist_cocd_paper-cnn_seed1"
    assert paper.result_name(names(model="paper-cnn"), "mnist-ablations", False) == "paper_mnist-ablations_paper-cnn"


def test_mnist_ablations_leave_out_the_values_of_their_defaults():
    base = dict(lr=1e-2, eps=1.0, budget=256, gamma=1.0, weight_decay=1e-4)
    runs = dict(paper.ablation_settings(paper.ABLATE_DEFAULT, base, 19_654, skip_base=True))
    assert list(runs) == ["eps=0.1", "eps=3.0", "gamma=0.0", "gamma=0.9", "gamma=0.99", "budget=16", "budget=64",
                          "M=0.5", "M=0.25"]
    assert runs["M=0.25"] == dict(base, memory=4914) and runs["gamma=0.9"] == dict(base, gamma=0.9)
    sarcos = paper.ablation_settings(["M"], base, 12_039)  # SARCOS keeps M = 1 as its reference run
    assert [label for label, _ in sarcos] == ["M=1.0", "M=0.5", "M=0.25"]


def test_paper_cnn_fits_both_budget_percentages():
    from edgezo.exporters.models import paper_cnn
    mnist = sum(p.numel() for p in paper_cnn().parameters())
    cifar = sum(p.numel() for p in paper_cnn(3, 32).parameters())
    assert (mnist, cifar) == (19_654, 24_350)
    assert round(100 * 256 / mnist, 1) == 1.3 and round(100 * 1024 / cifar, 1) == 4.2


def test_paper_steps_become_epochs_of_the_small_split():
    args = argparse.Namespace(match_paper_steps=True, epochs=50)
    train = {"x": [[0.0]] * 3559, "y": [[0.0]] * 3559}  # the 80% train part of the 4,449-row split
    assert paper.sarcos_epochs(args, train) == 622  # 50 x 696 = 34,800 paper steps, 56 per epoch here


@pytest.mark.skipif(not (DATASETS / "sarcos" / "sarcos_inv_test.mat").exists(),
                    reason="../shared/datasets/sarcos/sarcos_inv_test.mat is missing")
def test_one_sarcos_epoch_writes_json_and_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(paper, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["paper.py", "--tasks", "sarcos", "--epochs", "1", "--optimizers", "cocd", "bccd",
                                      "--threads", "1"])
    assert paper.main() == 0
    result = json.loads((tmp_path / "paper_sarcos_cocd_bccd.json").read_text())
    assert [r["label"] for r in result["runs"]] == ["CoCD", "BCCD"]
    for r in result["runs"]:
        assert r["steps"] == 56 and len(r["history"]) == 1
        assert math.isfinite(r["history"][0]["val_loss"]) and r["history"][0]["val_loss"] < 1.5
    assert (tmp_path / "paper_sarcos_cocd_bccd.png").stat().st_size > 0
    assert "val MSE" in capsys.readouterr().out
