"""Torch-free zeroth-order optimizers with an ask/tell interface.

`ask()` returns a probe (the points to evaluate); the caller evaluates one loss per probe row, in row
order, and hands them to `tell(losses)`, which updates `params` in place. See DESIGN.md, "Probes".
"""
import json
from dataclasses import dataclass

import numpy as np

from .errors import EdgezoError, check


@dataclass(frozen=True)
class CoordinateProbe:
    """Row p is params with params[index[p]] += delta[p]; delta 0 is the unperturbed point."""
    index: np.ndarray
    delta: np.ndarray

    def __len__(self):
        return len(self.index)


@dataclass(frozen=True)
class DirectionProbe:
    """Row p is params + scales[p] * direction(seeds[p], n, distribution)."""
    seeds: np.ndarray
    scales: np.ndarray
    distribution: str

    def __len__(self):
        return len(self.seeds)


def direction(seed, n, distribution, dtype=np.float32):
    """The length-n direction of a seed: drawn in float64 by PCG64(seed), cast to dtype."""
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    if distribution == "normal":
        return rng.standard_normal(n).astype(dtype, copy=False)
    if distribution == "rademacher":
        return (rng.integers(0, 2, n) * 2 - 1).astype(dtype)
    raise EdgezoError(f"distribution must be 'normal' or 'rademacher', got {distribution!r}")


def perturbed(params, probe, row):
    """A new array: params moved to the probe's row (never perturbs params in place)."""
    x = params.copy()
    if isinstance(probe, CoordinateProbe):
        x[probe.index[row]] += probe.delta[row]
    elif probe.scales[row] != 0:
        x += probe.scales[row] * direction(probe.seeds[row], len(x), probe.distribution, x.dtype)
    return x


def _check_params(params):
    ok = isinstance(params, np.ndarray) and params.ndim == 1 and params.dtype.kind == "f" and params.size > 0
    shape = getattr(params, "shape", None)
    dtype = getattr(params, "dtype", type(params).__name__)
    check(ok, f"params must be a non-empty 1-D float numpy array, got shape {shape} dtype {dtype}")
    check(params.flags.writeable and params.flags.c_contiguous,
          "params must be a writeable, C-contiguous array (it is updated in place)")
    return params


def _positive(name, value):
    check(np.isfinite(value) and value > 0, f"{name} must be > 0, got {value!r}")
    return value


def _nonnegative(name, value):
    check(np.isfinite(value) and value >= 0, f"{name} must be >= 0, got {value!r}")
    return value


class AskTell:
    """Shared bookkeeping: one pending probe at a time, losses checked before any update."""

    def __init__(self, params, lr):
        self.params = _check_params(params)
        self.lr = _nonnegative("lr", lr)
        self.steps = 0
        self._pending = None

    def ask(self):
        if self._pending is not None:
            raise EdgezoError("ask() called twice without tell(): evaluate the pending probe and tell its losses")
        self._pending = self._make_probe()
        return self._pending

    def tell(self, losses):
        if self._pending is None:
            raise EdgezoError("tell() called without a pending ask()")
        losses = np.asarray(losses, dtype=np.float64).reshape(-1)
        expected = len(self._pending)
        check(losses.size == expected, f"losses must have {expected} values (one per probe row), got {losses.size}")
        bad = np.flatnonzero(~np.isfinite(losses))
        check(bad.size == 0, f"losses must be finite, got {losses[bad[0]] if bad.size else None} at row "
                             f"{bad[0] if bad.size else None}")
        probe, self._pending = self._pending, None
        self._update(probe, losses)
        self.steps += 1

    def discard(self):
        """Forget a pending probe (for example after a failed evaluation)."""
        self._pending = None

    def state_dict(self):
        state = {"type": type(self).__name__, "steps": self.steps}
        state.update(self._state())
        return state

    def load_state_dict(self, state):
        check(state.get("type") == type(self).__name__,
              f"state_dict is for {state.get('type')!r}, not {type(self).__name__!r}")
        self._load_state(state)
        self.steps = int(state["steps"])
        self._pending = None

    def _state(self):
        return {"lr": self.lr}

    def _load_state(self, state):
        self.lr = float(state["lr"])


class CoCD(AskTell):
    """Coherent Coordinate Descent (flat form of DESIGN.md, "CoCD, normative").

    Each step refreshes `budget` consecutive coordinates of a gradient buffer of `memory` slots by
    finite differences, decays the rest by `gamma`, and moves the `memory` most recently refreshed
    coordinates by the buffer (with decoupled weight decay).
    """

    def __init__(self, params, lr, eps, budget, memory=None, gamma=1.0, weight_decay=0.0,
                 central=True, init_buffer=None):
        super().__init__(params, lr)
        n = params.size
        self.eps = _positive("eps", eps)
        check(isinstance(budget, (int, np.integer)) and budget > 0, f"budget must be an integer > 0, got {budget!r}")
        self.budget = int(budget)
        memory = n if memory is None else memory
        check(isinstance(memory, (int, np.integer)) and 1 <= memory <= n,
              f"memory must be an integer in [1, n={n}], got {memory!r}")
        self.memory = int(memory)
        check(np.isfinite(gamma) and 0.0 <= gamma <= 1.0, f"gamma must be in [0, 1], got {gamma!r}")
        self.gamma = float(gamma)
        self.weight_decay = _nonnegative("weight_decay", weight_decay)
        self.central = bool(central)
        self.buffer = np.zeros(self.memory, dtype=params.dtype)
        if init_buffer is not None:
            init = np.asarray(init_buffer)
            check(init.shape == (self.memory,), f"init_buffer must have shape ({self.memory},), got {init.shape}")
            self.buffer[:] = init
        self.refreshed = 0  # K: coordinates refreshed so far

    def coordinates(self):
        """The coordinates the next step refreshes, in refresh order."""
        return (self.refreshed + np.arange(self.budget, dtype=np.int64)) % self.params.size

    def _make_probe(self):
        coords = self.coordinates()
        eps = np.full(self.budget, self.eps, dtype=self.params.dtype)
        if self.central:
            return CoordinateProbe(np.concatenate([coords, coords]), np.concatenate([eps, -eps]))
        return CoordinateProbe(np.concatenate([[0], coords]), np.concatenate([[0], eps]).astype(self.params.dtype))

    def _update(self, probe, losses):
        n, m, B = self.params.size, self.memory, self.budget
        if self.central:
            estimates = (losses[:B] - losses[B:]) / (2 * self.eps)
        else:
            estimates = (losses[1:] - losses[0]) / self.eps
        self.buffer *= self.gamma
        keep = min(B, m)  # when B > m, later coordinates overwrite earlier slots
        slots = (self.refreshed + np.arange(B - keep, B)) % m
        self.buffer[slots] = estimates[B - keep:]
        self.refreshed += B
        window = max(0, self.refreshed - m) + np.arange(m)
        coords, slots = window % n, window % m
        x = self.params
        lr, wd = self.lr, self.weight_decay
        if np.ndim(lr) or np.ndim(wd):  # per-coordinate rates (torch param groups): (n,) arrays
            lr, wd = np.broadcast_to(lr, (n,))[coords], np.broadcast_to(wd, (n,))[coords]
        x[coords] = x[coords] * (1 - lr * wd) - lr * self.buffer[slots]

    def _state(self):
        return {"lr": self.lr, "eps": self.eps, "budget": self.budget, "memory": self.memory,
                "gamma": self.gamma, "weight_decay": self.weight_decay, "central": self.central,
                "refreshed": self.refreshed, "buffer": self.buffer.copy()}

    def _load_state(self, state):
        for key in ("budget", "memory", "central"):
            check(state[key] == getattr(self, key), f"state_dict {key}={state[key]!r} does not match "
                                                     f"this optimizer's {key}={getattr(self, key)!r}")
        buffer = np.asarray(state["buffer"])
        check(buffer.shape == self.buffer.shape, f"state_dict buffer has shape {buffer.shape}, "
                                                 f"expected {self.buffer.shape}")
        self.lr, self.eps = float(state["lr"]), float(state["eps"])
        self.gamma, self.weight_decay = float(state["gamma"]), float(state["weight_decay"])
        self.refreshed = int(state["refreshed"])
        self.buffer[:] = buffer


def BCCD(params, lr, eps, budget, memory=None, weight_decay=0.0, central=True, init_buffer=None):
    """Block cyclic coordinate descent: CoCD without buffer reuse (gamma = 0)."""
    return CoCD(params, lr, eps, budget, memory=memory, gamma=0.0, weight_decay=weight_decay,
                central=central, init_buffer=init_buffer)


class _Directional(AskTell):
    """Shared by the direction-probe optimizers: fresh seeds per step from a seeded generator."""

    def __init__(self, params, lr, mu, directions, seed, distribution):
        super().__init__(params, lr)
        self.mu = _positive("mu", mu)
        check(isinstance(directions, (int, np.integer)) and directions >= 1,
              f"directions must be an integer >= 1, got {directions!r}")
        self.directions, self.distribution = int(directions), distribution
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def _seeds(self):
        return self.rng.integers(0, 2 ** 63 - 1, self.directions, dtype=np.int64)

    def _central_probe(self):
        seeds = self._seeds()
        scales = np.full(self.directions, self.mu)
        return DirectionProbe(np.concatenate([seeds, seeds]), np.concatenate([scales, -scales]), self.distribution)

    def _apply(self, seeds, coefficients):
        """params -= lr * sum_k coefficients[k] * z(seeds[k]) / q, regenerating each z from its seed."""
        for seed, c in zip(seeds, coefficients):
            self.params -= (self.lr * c / self.directions) * direction(seed, self.params.size, self.distribution,
                                                                       self.params.dtype)

    def _state(self):
        return {"lr": self.lr, "mu": self.mu, "directions": self.directions, "rng": json.dumps(self.rng.bit_generator.state)}

    def _load_state(self, state):
        self.lr, self.mu = float(state["lr"]), float(state["mu"])
        self.rng.bit_generator.state = json.loads(state["rng"])


class SPSA(_Directional):
    """Simultaneous perturbation: central differences along Rademacher directions."""

    def __init__(self, params, lr, mu=1e-3, directions=1, seed=0):
        super().__init__(params, lr, mu, directions, seed, "rademacher")

    _make_probe = _Directional._central_probe

    def _update(self, probe, losses):
        q = self.directions
        self._apply(probe.seeds[:q], (losses[:q] - losses[q:]) / (2 * self.mu))


class MeZOSGD(SPSA):
    """MeZO-style ZO-SGD: central differences along Gaussian directions regenerated from their seeds;
    nothing n-sized is kept between ask and tell."""

    def __init__(self, params, lr, mu=1e-3, directions=1, seed=0):
        _Directional.__init__(self, params, lr, mu, directions, seed, "normal")


class ZOSGD(_Directional):
    """ZO-SGD (Ghadimi and Lan): one-sided differences along q Gaussian directions with smoothing mu,
    one shared base evaluation. The directions are materialized at ask() and kept until tell()."""

    def __init__(self, params, lr, mu=1e-3, directions=1, seed=0):
        super().__init__(params, lr, mu, directions, seed, "normal")
        self._directions = None

    def _make_probe(self):
        seeds = self._seeds()
        self._directions = np.stack([direction(s, self.params.size, "normal", self.params.dtype) for s in seeds])
        return DirectionProbe(np.concatenate([[0], seeds]), np.concatenate([[0.0], np.full(self.directions, self.mu)]),
                              "normal")

    def _update(self, probe, losses):
        coefficients = (losses[1:] - losses[0]) / self.mu
        self.params -= (self.lr / self.directions) * (coefficients.astype(self.params.dtype) @ self._directions)
        self._directions = None

    def discard(self):
        super().discard()
        self._directions = None


class CGE(AskTell):
    """DeepZero's coordinate-wise gradient estimate: one-sided differences on `budget` consecutive
    coordinates per step (default all n) with one shared base evaluation, then SGD on them."""

    def __init__(self, params, lr, mu=1e-3, budget=None, weight_decay=0.0):
        super().__init__(params, lr)
        self.mu = _positive("mu", mu)
        budget = params.size if budget is None else budget
        check(isinstance(budget, (int, np.integer)) and 1 <= budget <= params.size,
              f"budget must be an integer in [1, n={params.size}], got {budget!r}")
        self.budget, self.weight_decay, self.refreshed = int(budget), _nonnegative("weight_decay", weight_decay), 0

    def _make_probe(self):
        coords = (self.refreshed + np.arange(self.budget, dtype=np.int64)) % self.params.size
        delta = np.concatenate([[0], np.full(self.budget, self.mu)]).astype(self.params.dtype)
        return CoordinateProbe(np.concatenate([[0], coords]), delta)

    def _update(self, probe, losses):
        coords = probe.index[1:]
        grad = (losses[1:] - losses[0]) / self.mu
        x = self.params
        x[coords] = x[coords] * (1 - self.lr * self.weight_decay) - self.lr * grad
        self.refreshed += self.budget

    def _state(self):
        return {"lr": self.lr, "mu": self.mu, "budget": self.budget, "refreshed": self.refreshed}

    def _load_state(self, state):
        self.lr, self.mu, self.refreshed = float(state["lr"]), float(state["mu"]), int(state["refreshed"])
