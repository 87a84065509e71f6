"""Independent onnxruntime calls of one step run side by side, each session single-threaded.

A step's per-probe calls (a suffix on a chunk of stacked copies, the owner op once per perturbation, the generic
path's and a direction probe's rows) do not depend on each other. On one probe's tensors (a small model's batch)
onnxruntime's intra-op threads spend much of each op waiting on each other; whole calls side by side keep every core
busy. The sessions that serve them allocate from one shared arena (sessions.shared_arena). Measured on the int8
transformer's --scales steps (2 cores, one cycle): see benchmarks/lowprec_speed.py and docs/results.md."""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SIDE_BY_SIDE_BYTES = 2 ** 20


def cpu_workers(threads):
    """Calls side by side for `threads` (None: the cores this process may use)."""
    if threads:
        return int(threads)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Fanout:
    """Runs fn over contiguous parts of range(n) on `workers` threads (onnxruntime releases the GIL in run)."""

    def __init__(self, workers):
        self.workers, self._pool, self._pid = max(1, int(workers)), None, None

    def parts(self, n):
        bounds = np.linspace(0, n, min(self.workers, n) + 1).astype(int)
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def split(self, n, fn, nbytes):
        """fn(slice) for each part, side by side, where `nbytes` (the calls' rows times the widest activation they
        may compute: a measure of their work that the input alone is not, an SE gate's 96 values feed the rest of a
        MobileNetV3) reaches SIDE_BY_SIDE_BYTES; below it in one call (handing small calls to threads cost more than
        it saved, the int8 transformer head's steps 5.5 -> 6.1 ms). Their results (arrays) concatenated in order."""
        parts = self.parts(n)
        if len(parts) < 2 or nbytes < SIDE_BY_SIDE_BYTES:
            return fn(slice(0, n))
        if self._pool is None or self._pid != os.getpid():  # a forked child does not inherit the threads
            self._pool, self._pid = ThreadPoolExecutor(self.workers, thread_name_prefix="edgezo-probes"), os.getpid()
        return np.concatenate(list(self._pool.map(fn, parts)))
