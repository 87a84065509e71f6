import json

import numpy as np
import pytest
import torch

from edgezo.runtime.errors import EdgezoError
from edgezo.torch import CoCD
from test_golden import GOLDEN


def test_dropin_follows_the_golden_mlp_trajectory():
    data = np.load(GOLDEN / "mlp_ring.npz")
    config = json.loads(str(data["config"]))
    layers = data["layers"].tolist()
    modules = []
    for i, (a, b) in enumerate(zip(layers[:-1], layers[1:])):
        modules.append(torch.nn.Linear(a, b).double())
        if i < len(layers) - 2:
            modules.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*modules)
    theta = data["theta"]
    torch.nn.utils.vector_to_parameters(torch.from_numpy(theta[0].copy()), model.parameters())
    opt = CoCD(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"], eps=config["eps"],
               compute_budget=config["budget"], memory_budget=config["memory"], momentum=config["gamma"])
    assert opt.buffer.dtype == torch.float64
    for t in range(config["steps"]):
        X, Y = torch.from_numpy(data["X"][t]), torch.from_numpy(data["Y"][t])
        opt.step(lambda: torch.nn.functional.mse_loss(model(X), Y))
        flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
        for ours, golden in ((flat, theta[t + 1]), (opt.buffer.numpy(), data["buffer"][t])):
            assert np.max(np.abs(ours - golden)) <= 1e-8 * (1 + np.max(np.abs(golden))), f"step {t}"


def test_dropin_state_dict_and_reset():
    model = torch.nn.Linear(4, 2)
    opt = CoCD(model.parameters(), lr=0.01, eps=0.1, compute_budget=3, init_grad=0.5)
    assert torch.all(opt.buffer == 0.5)
    x = torch.randn(8, 4)
    opt.step(lambda: model(x).pow(2).mean())
    state = opt.state_dict()
    opt2 = CoCD(model.parameters(), lr=0.01, eps=0.1, compute_budget=3)
    opt2.load_state_dict(state)
    assert torch.equal(opt2.buffer, opt.buffer) and opt2.core.refreshed == 3
    opt2.reset()
    assert opt2.core.refreshed == 0 and torch.all(opt2.buffer == 0)


def test_probe_restores_weights_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = CoCD(model.parameters(), lr=0.0, eps=0.1, compute_budget=4)
    x = torch.randn(5, 3)
    for _ in range(10):
        opt.step(lambda: model(x).sum())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _line_problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    return model, (lambda: torch.nn.functional.mse_loss(model(x), y))


def test_step_lr_scheduler_changes_the_step_size():
    model, closure = _line_problem()
    opt = CoCD(model.parameters(), lr=0.1, eps=0.01, compute_budget=8, momentum=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)  # lr 0 from the second step on
    opt.step(closure)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "lr 0 must not move the weights"
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=10.0)
    for group in opt.param_groups:
        group["lr"] = 1e-3
    opt.step(closure)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_two_param_groups_use_their_own_lr_and_weight_decay():
    def separable(model):  # the weight's difference quotients do not depend on the bias
        return lambda: (model.weight - 1).pow(2).sum() + (model.bias + 2).pow(2).sum()
    model, twin = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    twin.load_state_dict(model.state_dict())
    opt = CoCD([{"params": [model.weight], "lr": 0.05, "weight_decay": 0.1}, {"params": [model.bias], "lr": 0.0}],
               eps=0.01, compute_budget=8, momentum=0.5)
    ref = CoCD(twin.parameters(), lr=0.05, weight_decay=0.1, eps=0.01, compute_budget=8, momentum=0.5)
    bias = model.bias.detach().clone()
    for _ in range(3):
        opt.step(separable(model))
        ref.step(separable(twin))
    assert torch.equal(model.bias, bias), "the lr-0 group stays put"
    assert not torch.equal(twin.bias, bias)
    assert torch.allclose(model.weight, twin.weight, rtol=0, atol=1e-12), "the weight group steps like one group"
    state = opt.state_dict()
    assert [g["lr"] for g in state["param_groups"]] == [0.05, 0.0]


def test_groups_that_differ_in_the_cycle_settings_are_refused():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(EdgezoError, match="must agree on eps"):
        CoCD([{"params": [model.weight], "eps": 0.1}, {"params": [model.bias], "eps": 0.2}], compute_budget=2)
