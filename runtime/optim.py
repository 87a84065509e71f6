"""Torch-free zeroth-order optimizers with an ask/tell interface, composed from small pieces.

`ask()` returns a probe (the points to evaluate); the caller evaluates one loss per probe row, in row order, and
hands them to `tell(losses)`, which updates `params` in place. See DESIGN.md, "Probes".

Each optimizer is an estimator (finite differences on coordinates, or along seeded directions) plus an update
(CoCD's memory buffer with decay gamma, then SGD with decoupled weight decay on the buffer's window), built from
the pure functions below. Its hyperparameters are one frozen settings object, `opt.settings`, kept apart from its
state: a scheduler or the divergence guard replaces the settings (`opt.lr = 0.01` is shorthand for that) and
never edits the state; `state_dict()` holds the two separately.
"""
import json
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from .errors import EdgezoError, check
from .probes import CoordinateProbe, DirectionProbe, direction, perturbed  # noqa: F401  (re-exported)

# ---------------------------------------------------------------- pieces


def cycle(refreshed, budget, n):
    """The `budget` coordinates after the first `refreshed` of the cyclic order, wrapping from n - 1 to 0."""
    return (refreshed + np.arange(budget, dtype=np.int64)) % n


def coordinate_probe(coords, eps, central, dtype):
    """Central: rows +eps then -eps on each coordinate. One-sided: the base point, then +eps on each."""
    step = np.full(len(coords), eps, dtype=dtype)
    if central:
        return CoordinateProbe(np.concatenate([coords, coords]), np.concatenate([step, -step]))
    return CoordinateProbe(np.concatenate([[0], coords]), np.concatenate([[0], step]).astype(dtype))


def coordinate_estimates(losses, eps, central):
    """Finite-difference derivative estimates along the probe's coordinates (float64)."""
    if central:
        b = len(losses) // 2
        return (losses[:b] - losses[b:]) / (2 * eps)
    return (losses[1:] - losses[0]) / eps


def remember(buffer, refreshed, estimates, gamma):
    """CoCD's memory: every slot decays by gamma; the estimates of coordinates refreshed+j go to slot
    (refreshed + j) mod m (when B > m, later ones overwrite earlier ones)."""
    m, b = len(buffer), len(estimates)
    buffer *= gamma
    keep = min(b, m)
    buffer[(refreshed + np.arange(b - keep, b)) % m] = estimates[b - keep:]


def window(refreshed, m, n):
    """(coordinates, slots) of the m most recently refreshed coordinates (0..m-1 before the buffer fills)."""
    w = max(0, refreshed - m) + np.arange(m)
    return w % n, w % m


def decayed_step(x, coords, grad, lr, weight_decay):
    """x[coords] <- x[coords] (1 - lr wd) - lr grad: SGD with decoupled weight decay on those coordinates only
    (lr and wd may be per-coordinate arrays of length n)."""
    if np.ndim(lr) or np.ndim(weight_decay):
        lr, weight_decay = (np.broadcast_to(v, (x.size,))[coords] for v in (lr, weight_decay))
    x[coords] = x[coords] * (1 - lr * weight_decay) - lr * grad


def direction_probe(seeds, mu, distribution, central):
    """Central: rows +mu then -mu along each seed's direction. One-sided: the base point, then +mu along each."""
    scales = np.full(len(seeds), mu)
    if central:
        return DirectionProbe(np.concatenate([seeds, seeds]), np.concatenate([scales, -scales]), distribution)
    return DirectionProbe(np.concatenate([[0], seeds]), np.concatenate([[0.0], scales]), distribution)


def decay(x, lr, weight_decay):
    """Decoupled weight decay of every coordinate (the directional methods move all of them)."""
    if weight_decay:
        x *= 1 - lr * weight_decay


# ---------------------------------------------------------------- settings


def _positive(name, value):
    check(np.isfinite(value) and value > 0, f"{name} must be > 0, got {value!r}")


def _nonnegative(name, value):
    check(np.isfinite(value) and value >= 0, f"{name} must be >= 0, got {value!r}")


def _count(name, value, low, high=None):
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low and \
        (high is None or value <= high)
    bound = f"in [{low}, n={high}]" if high is not None else f">= {low}" if low > 1 else "> 0"
    check(ok, f"{name} must be an integer {bound}, got {value!r}")


@dataclass(frozen=True)
class CoordinateSettings:
    """CoCD / BCCD: lr, eps (finite-difference radius), budget B (coordinates refreshed per step), memory m
    (buffer slots), gamma (buffer decay; 0 is BCCD), decoupled weight decay, central or one-sided differences."""
    lr: float
    eps: float
    budget: int
    memory: int
    gamma: float = 1.0
    weight_decay: float = 0.0
    central: bool = True

    def validate(self, n):
        _nonnegative("lr", self.lr)
        _positive("eps", self.eps)
        _count("budget", self.budget, 1)
        _count("memory", self.memory, 1, n)
        check(np.isfinite(self.gamma) and 0.0 <= self.gamma <= 1.0, f"gamma must be in [0, 1], got {self.gamma!r}")
        _nonnegative("weight_decay", self.weight_decay)


@dataclass(frozen=True)
class DirectionSettings:
    """SPSA / MeZO / ZO-SGD: lr, mu (perturbation size along a direction), directions per step, weight decay."""
    lr: float
    mu: float = 1e-3
    directions: int = 1
    weight_decay: float = 0.0

    def validate(self, n):
        _nonnegative("lr", self.lr)
        _positive("mu", self.mu)
        _count("directions", self.directions, 1)
        _nonnegative("weight_decay", self.weight_decay)


@dataclass(frozen=True)
class CGESettings:
    """DeepZero's CGE: lr, mu (one-sided difference step), budget (coordinates per step), weight decay."""
    lr: float
    mu: float
    budget: int
    weight_decay: float = 0.0

    def validate(self, n):
        _nonnegative("lr", self.lr)
        _positive("mu", self.mu)
        _count("budget", self.budget, 1, n)
        _nonnegative("weight_decay", self.weight_decay)


# ---------------------------------------------------------------- optimizers


def _check_params(params):
    ok = isinstance(params, np.ndarray) and params.ndim == 1 and params.dtype.kind == "f" and params.size > 0
    shape = getattr(params, "shape", None)
    dtype = getattr(params, "dtype", type(params).__name__)
    check(ok, f"params must be a non-empty 1-D float numpy array, got shape {shape} dtype {dtype}")
    check(params.flags.writeable and params.flags.c_contiguous,
          "params must be a writeable, C-contiguous array (it is updated in place)")
    return params


class AskTell:
    """Shared bookkeeping: one pending probe at a time, losses checked before any update. Settings are read as
    attributes (opt.lr) and replaced, not edited, when set (opt.lr = 0.01)."""
    FIXED = ()  # settings that shape the state: a state_dict with other values does not load

    def __init__(self, params, settings):
        self.params = _check_params(params)
        settings.validate(params.size)
        self.settings = settings
        self.steps = 0
        self._pending = None

    def __getattr__(self, name):
        settings = self.__dict__.get("settings")
        if settings is not None and name in settings.__dataclass_fields__:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __setattr__(self, name, value):
        settings = self.__dict__.get("settings")
        if settings is not None and name in settings.__dataclass_fields__:
            value = replace(settings, **{name: value})
            if all(np.ndim(getattr(value, f.name)) == 0 for f in fields(value)):
                value.validate(self.params.size)
            name = "settings"
        object.__setattr__(self, name, value)

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
        """{"type", "steps", "settings": the hyperparameters, "state": what tell() changes} (JSON scalars and
        numpy arrays only: a checkpoint stores it without pickle)."""
        return {"type": type(self).__name__, "steps": self.steps, "settings": asdict(self.settings),
                "state": self._state()}

    def load_state_dict(self, state):
        check(state.get("type") == type(self).__name__,
              f"state_dict is for {state.get('type')!r}, not {type(self).__name__!r}")
        if "settings" not in state:  # written before settings were kept apart: one flat dict
            names = self.settings.__dataclass_fields__
            state = {"type": state["type"], "steps": state["steps"],
                     "settings": {k: v for k, v in state.items() if k in names},
                     "state": {k: v for k, v in state.items() if k not in names}}
        saved = state["settings"]
        for key in self.FIXED:
            check(saved.get(key, getattr(self.settings, key)) == getattr(self.settings, key),
                  f"state_dict {key}={saved.get(key)!r} does not match this optimizer's {key}="
                  f"{getattr(self.settings, key)!r}")
        kinds = {f.name: f.type for f in fields(self.settings)}
        restored = {k: v if np.ndim(v) else kinds[k](v) for k, v in saved.items() if k in kinds and k not in self.FIXED}
        self._load_state(state["state"])
        self.settings = replace(self.settings, **restored)
        self.steps = int(state["steps"])
        self._pending = None


class CoCD(AskTell):
    """Coherent Coordinate Descent (flat form of DESIGN.md, "CoCD, normative").

    Each step refreshes `budget` consecutive coordinates of a gradient buffer of `memory` slots by
    finite differences, decays the rest by `gamma`, and moves the `memory` most recently refreshed
    coordinates by the buffer (with decoupled weight decay).
    """
    FIXED = ("budget", "memory", "central")

    def __init__(self, params, lr, eps, budget, memory=None, gamma=1.0, weight_decay=0.0,
                 central=True, init_buffer=None):
        n = _check_params(params).size
        super().__init__(params, CoordinateSettings(lr, eps, budget, n if memory is None else memory, gamma,
                                                    weight_decay, bool(central)))
        self.buffer = np.zeros(self.settings.memory, dtype=params.dtype)
        if init_buffer is not None:
            init = np.asarray(init_buffer)
            check(init.shape == (self.settings.memory,),
                  f"init_buffer must have shape ({self.settings.memory},), got {init.shape}")
            self.buffer[:] = init
        self.refreshed = 0  # K: coordinates refreshed so far

    def coordinates(self):
        """The coordinates the next step refreshes, in refresh order."""
        return cycle(self.refreshed, self.settings.budget, self.params.size)

    def _make_probe(self):
        s = self.settings
        return coordinate_probe(self.coordinates(), s.eps, s.central, self.params.dtype)

    def _update(self, probe, losses):
        s = self.settings
        remember(self.buffer, self.refreshed, coordinate_estimates(losses, s.eps, s.central), s.gamma)
        self.refreshed += s.budget
        coords, slots = window(self.refreshed, s.memory, self.params.size)
        decayed_step(self.params, coords, self.buffer[slots], s.lr, s.weight_decay)

    def _state(self):
        return {"refreshed": self.refreshed, "buffer": self.buffer.copy()}

    def _load_state(self, state):
        buffer = np.asarray(state["buffer"])
        check(buffer.shape == self.buffer.shape, f"state_dict buffer has shape {buffer.shape}, "
                                                 f"expected {self.buffer.shape}")
        self.refreshed = int(state["refreshed"])
        self.buffer[:] = buffer


def BCCD(params, lr, eps, budget, memory=None, weight_decay=0.0, central=True, init_buffer=None):
    """Block cyclic coordinate descent: CoCD without buffer reuse (gamma = 0)."""
    return CoCD(params, lr, eps, budget, memory=memory, gamma=0.0, weight_decay=weight_decay,
                central=central, init_buffer=init_buffer)


class _Directional(AskTell):
    """Shared by the direction-probe optimizers: fresh seeds per step from a seeded generator."""
    FIXED = ("directions",)
    distribution = "normal"
    central = True

    def __init__(self, params, lr, mu=1e-3, directions=1, seed=0, weight_decay=0.0):
        super().__init__(params, DirectionSettings(lr, mu, directions, weight_decay))
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def _make_probe(self):
        self._rng_before = self.rng.bit_generator.state
        seeds = self.rng.integers(0, 2 ** 63 - 1, self.settings.directions, dtype=np.int64)
        return direction_probe(seeds, self.settings.mu, self.distribution, self.central)

    def discard(self):
        """As if the pending probe was never asked: its seeds are drawn again by the next ask()."""
        if self._pending is not None:
            self.rng.bit_generator.state = self._rng_before
        super().discard()

    def _update(self, probe, losses):
        """params -= lr * sum_k c_k z(seed_k) / q, each z regenerated from its seed (nothing n-sized kept)."""
        s = self.settings
        q = s.directions
        decay(self.params, s.lr, s.weight_decay)
        for seed, c in zip(probe.seeds[:q], (losses[:q] - losses[q:]) / (2 * s.mu)):
            self.params -= (s.lr * c / q) * direction(seed, self.params.size, self.distribution, self.params.dtype)

    def _state(self):
        return {"rng": json.dumps(self.rng.bit_generator.state)}

    def _load_state(self, state):
        self.rng.bit_generator.state = json.loads(state["rng"])


class SPSA(_Directional):
    """Simultaneous perturbation: central differences along Rademacher directions."""
    distribution = "rademacher"


class MeZOSGD(_Directional):
    """MeZO-style ZO-SGD: central differences along Gaussian directions regenerated from their seeds;
    nothing n-sized is kept between ask and tell."""


class ZOSGD(_Directional):
    """ZO-SGD (Ghadimi and Lan): one-sided differences along q Gaussian directions with smoothing mu,
    one shared base evaluation. The directions are materialized at ask() and kept until tell()."""
    central = False

    def __init__(self, params, lr, mu=1e-3, directions=1, seed=0, weight_decay=0.0):
        super().__init__(params, lr, mu, directions, seed, weight_decay)
        self._directions = None

    def _make_probe(self):
        probe = super()._make_probe()
        self._directions = np.stack([direction(s, self.params.size, "normal", self.params.dtype)
                                     for s in probe.seeds[1:]])
        return probe

    def _update(self, probe, losses):
        s = self.settings
        coefficients = (losses[1:] - losses[0]) / s.mu
        decay(self.params, s.lr, s.weight_decay)
        self.params -= (s.lr / s.directions) * (coefficients.astype(self.params.dtype) @ self._directions)
        self._directions = None

    def discard(self):
        super().discard()
        self._directions = None


class CGE(AskTell):
    """DeepZero's coordinate-wise gradient estimate: one-sided differences on `budget` consecutive
    coordinates per step (default all n) with one shared base evaluation, then SGD on them."""

    def __init__(self, params, lr, mu=1e-3, budget=None, weight_decay=0.0):
        n = _check_params(params).size
        super().__init__(params, CGESettings(lr, mu, n if budget is None else budget, weight_decay))
        self.refreshed = 0

    def _make_probe(self):
        s = self.settings
        return coordinate_probe(cycle(self.refreshed, s.budget, self.params.size), s.mu, False, self.params.dtype)

    def _update(self, probe, losses):
        s = self.settings
        decayed_step(self.params, probe.index[1:], coordinate_estimates(losses, s.mu, False), s.lr, s.weight_decay)
        self.refreshed += s.budget

    def _state(self):
        return {"refreshed": self.refreshed}

    def _load_state(self, state):
        self.refreshed = int(state["refreshed"])
