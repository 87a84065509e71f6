"""Drop-in replacement for the authors' torch CoCD optimizer (same constructor and step(closure)).

    from edgezo.torch import CoCD       # instead of the reference implementation's import
    opt = CoCD(model.parameters(), lr=1e-3, eps=0.1, compute_budget=64, memory_budget=None, momentum=1.0)
    loss = opt.step(closure)            # closure() returns the loss; no backward needed

The arithmetic is the torch-free core's (edgezo.runtime.optim.CoCD) on a flat copy of the
parameters in their dtype. Each probe point changes one weight and restores its exact old value
afterwards, so weights never drift by rounding (the reference's in-place +eps, -2eps, +eps does).
"""
import numpy as np
import torch

from .runtime import optim as core

_NP = {torch.float32: np.float32, torch.float64: np.float64}


class CoCD(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, weight_decay=0.0, init_grad=None, eps=1e-3, compute_budget=1,
                 memory_budget=None, momentum=1.0, central_difference=True):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self._params = [p for g in self.param_groups for p in g["params"]]
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) != 1 or next(iter(dtypes)) not in _NP:
            raise core.EdgezoError(f"CoCD needs parameters of one float dtype (float32 or float64), got {dtypes}")
        self._sizes = [p.numel() for p in self._params]
        self._config = dict(lr=lr, eps=eps, budget=compute_budget, memory=memory_budget, gamma=momentum,
                            weight_decay=weight_decay, central=central_difference)
        self._init_grad = init_grad
        self.reset()

    def _flat(self):
        return torch.cat([p.detach().reshape(-1).cpu() for p in self._params]).numpy().copy()

    def reset(self):
        """Start over: zero (or init_grad) buffer, refresh counter 0, parameters as they are now."""
        flat = self._flat()
        init = self._init_grad
        if init is not None and np.ndim(init) == 0:
            memory = self._config["memory"] or flat.size
            init = np.full(memory, float(init))
        elif isinstance(init, torch.Tensor):
            init = init.detach().cpu().numpy()
        self.core = core.CoCD(flat, init_buffer=init, **self._config)

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
        state = self.core.state_dict()
        state["buffer"] = torch.from_numpy(state["buffer"].copy())
        return state

    def load_state_dict(self, state):
        state = dict(state)
        state["buffer"] = np.asarray(state["buffer"].cpu() if isinstance(state["buffer"], torch.Tensor)
                                     else state["buffer"])
        self.core.load_state_dict(state)
