"""Drop-in replacement for the authors' torch CoCD optimizer (same constructor and step(closure)).

    from edgezo.torch import CoCD       # instead of the reference implementation's import
    opt = CoCD(model.parameters(), lr=1e-3, eps=0.1, compute_budget=64, memory_budget=None, momentum=1.0)
    loss = opt.step(closure)            # closure() returns the loss; no backward needed

The arithmetic is the torch-free core's (edgezo.runtime.optim.CoCD) on a flat copy of the
parameters in their dtype. Each probe point changes one weight and restores its exact old value
afterwards, so weights never drift by rounding (the reference's in-place +eps, -2eps, +eps does).

Like any torch.optim optimizer, lr and weight_decay are read from `param_groups` at every step, so
torch.optim.lr_scheduler works, and groups may differ in them. eps, compute_budget, memory_budget,
momentum and central_difference belong to the one coordinate cycle over all parameters: every group must
agree on them (eps and momentum may be changed between steps, in all groups alike).
"""
import numpy as np
import torch

from .runtime import optim as core

_NP = {torch.float32: np.float32, torch.float64: np.float64}
CYCLE = ("eps", "compute_budget", "memory_budget", "momentum", "central_difference")


class CoCD(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, weight_decay=0.0, init_grad=None, eps=1e-3, compute_budget=1,
                 memory_budget=None, momentum=1.0, central_difference=True):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, eps=eps, compute_budget=compute_budget,
                                      memory_budget=memory_budget, momentum=momentum,
                                      central_difference=central_difference))
        self._params = [p for g in self.param_groups for p in g["params"]]
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) != 1 or next(iter(dtypes)) not in _NP:
            raise core.EdgezoError(f"CoCD needs parameters of one float dtype (float32 or float64), got {dtypes}")
        self._sizes = [p.numel() for p in self._params]
        self._init_grad = init_grad
        self.reset()

    def _cycle(self):
        """The cycle settings all groups share; a clear error naming the first one they disagree on."""
        first = self.param_groups[0]
        for key in CYCLE:
            values = [g[key] for g in self.param_groups]
            if any(v != values[0] for v in values):
                raise core.EdgezoError(f"CoCD param groups must agree on {key} (one coordinate cycle over all "
                                       f"parameters); got {values}. Groups may differ in lr and weight_decay only")
        return {key: first[key] for key in CYCLE}

    def _rates(self):
        """lr and weight_decay as scalars when all groups agree, else one value per flat coordinate."""
        lrs = [float(g["lr"]) for g in self.param_groups]
        wds = [float(g["weight_decay"]) for g in self.param_groups]
        if len(set(lrs)) == 1 and len(set(wds)) == 1:
            return lrs[0], wds[0]
        counts = [sum(p.numel() for p in g["params"]) for g in self.param_groups]
        return np.repeat(lrs, counts), np.repeat(wds, counts)

    def _flat(self):
        return torch.cat([p.detach().reshape(-1).cpu() for p in self._params]).numpy().copy()

    def reset(self):
        """Start over: zero (or init_grad) buffer, refresh counter 0, parameters as they are now."""
        c = self._cycle()
        flat = self._flat()
        init = self._init_grad
        if init is not None and np.ndim(init) == 0:
            memory = c["memory_budget"] or flat.size
            init = np.full(memory, float(init))
        elif isinstance(init, torch.Tensor):
            init = init.detach().cpu().numpy()
        lr, wd = self._rates()
        self.core = core.CoCD(flat, lr=0.0, eps=c["eps"], budget=c["compute_budget"], memory=c["memory_budget"],
                              gamma=c["momentum"], central=c["central_difference"], init_buffer=init)
        self.core.lr, self.core.weight_decay = lr, wd

    def _sync(self):
        """Settings from param_groups, read at every step (schedulers write lr there)."""
        c = self._cycle()
        for key, mine in (("compute_budget", self.core.budget), ("memory_budget", self.core.memory),
                          ("central_difference", self.core.central)):
            if key == "memory_budget" and c[key] is None:
                continue
            if c[key] != mine:
                raise core.EdgezoError(f"{key} changed from {mine} to {c[key]} after construction: build a new CoCD")
        self.core.eps, self.core.gamma = float(c["eps"]), float(c["momentum"])
        self.core.lr, self.core.weight_decay = self._rates()

    @property
    def buffer(self):
        return torch.from_numpy(self.core.buffer)

    def _locate(self, i):
        for p, size in zip(self._params, self._sizes):
            if i < size:
                return p.data.view(-1), i
            i -= size
        raise IndexError(i)

    @torch.no_grad()
    def step(self, closure):
        """One CoCD step: 2B (central) or B+1 (one-sided) closure calls; returns the mean probe loss."""
        self._sync()
        self.core.params[:] = self._flat()  # pick up changes made outside the optimizer
        probe = self.core.ask()
        losses = []
        for i, d in zip(probe.index.tolist(), probe.delta.tolist()):
            if d == 0:
                losses.append(float(closure()))
                continue
            flat, j = self._locate(i)
            old = flat[j].clone()
            flat[j] = old + torch.tensor(d, dtype=flat.dtype)
            losses.append(float(closure()))
            flat[j] = old
        self.core.tell(losses)
        offset = 0
        for p, size in zip(self._params, self._sizes):
            p.copy_(torch.from_numpy(self.core.params[offset:offset + size]).view_as(p))
            offset += size
        return float(np.mean(losses))

    def state_dict(self):
        """The core's settings and state (buffer as a tensor) plus each group's lr and weight_decay."""
        self._sync()
        state = self.core.state_dict()
        group = self.param_groups[0]  # the core's lr may be per coordinate; the groups keep the real values
        state["settings"].update(lr=float(group["lr"]), weight_decay=float(group["weight_decay"]))
        state["state"]["buffer"] = torch.from_numpy(state["state"]["buffer"].copy())
        state["param_groups"] = [{"lr": g["lr"], "weight_decay": g["weight_decay"]} for g in self.param_groups]
        return state

    def load_state_dict(self, state):
        state = dict(state)
        groups = state.pop("param_groups", None)
        inner = dict(state.get("state", state))
        inner["buffer"] = np.asarray(inner["buffer"].cpu() if isinstance(inner["buffer"], torch.Tensor)
                                     else inner["buffer"])
        state = dict(state, state=inner) if "state" in state else inner  # flat: written before settings were apart
        if groups is not None and len(groups) != len(self.param_groups):
            raise core.EdgezoError(f"state_dict has {len(groups)} param groups, this optimizer "
                                   f"{len(self.param_groups)}")
        self.core.load_state_dict(state)
        rates = {"lr": self.core.settings.lr, "weight_decay": self.core.settings.weight_decay}
        for group, saved in zip(self.param_groups, groups or [rates] * len(self.param_groups)):
            group.update(saved)
        self._sync()
