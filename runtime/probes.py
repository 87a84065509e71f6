"""Probes: the contract between optimizers and evaluation (DESIGN.md, "Probes"). No torch."""
from dataclasses import dataclass

import numpy as np

from .errors import EdgezoError

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


def coordinate_moves(params, index, delta):
    """params with params[i] += d for each (i, d) in turn, in one buffer put back after each (the engine's
    per-perturbation calls: a copy per row would cost every param each time). Use each before the next."""
    moved = params.copy()
    for i, d in zip(index, delta):
        moved[i] = params[i] + d
        yield moved
        moved[i] = params[i]


def perturbed(params, probe, row):
    """A new array: params moved to the probe's row (never perturbs params in place)."""
    x = params.copy()
    if isinstance(probe, CoordinateProbe):
        x[probe.index[row]] += probe.delta[row]
    elif probe.scales[row] != 0:
        x += probe.scales[row] * direction(probe.seeds[row], len(x), probe.distribution, x.dtype)
    return x
