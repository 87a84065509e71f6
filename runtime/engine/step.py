"""What the CPU and device engines share: the paths a trainable tensor's perturbations can take, and one step's
skeleton (base activations once, the unperturbed rows from them, each owner's rows in chunks under the memory
cap). The engines differ only in how they compute the base activations and evaluate an owner's copies."""
from collections import Counter
from dataclasses import dataclass
from enum import Enum

import numpy as np

from ..probes import CoordinateProbe
from .graph import Unsupported


class Path(Enum):
    ENGINE = "engine"    # the engine's kernels: delta propagation, numpy copies of the rest
    STACKED = "stacked"  # the owner's perturbed output directly, the rest in onnxruntime on copies stacked on the batch
    GENERIC = "generic"  # onnxruntime from the owner's inputs, one call per perturbation (the frozen part not rerun)
    OP_STACKED = "op-stacked"  # onnxruntime runs the owner op alone per perturbation (its weights computed from the
    #                            params: a quantized weight's scale, a fake-quantized bias), the rest stacked
    DEVICE = "device"    # the device engine's fused kernel-and-rest session
    PREFIX = "prefix"    # a direction probe: the frozen part once, the rest of the graph once per row
    NAIVE = "naive"      # one call of the whole loss graph per probe row


@dataclass(frozen=True)
class Route:
    """The path a trainable tensor's perturbations take, and what decided it (the ops or the reason)."""
    path: Path
    detail: str = ""

    def __str__(self):  # metrics.json's engine_paths: "engine", "stacked: Sigmoid", "generic: Erf (op Erf)"
        return self.path.value + (f": {self.detail}" if self.detail else "")


class StepEngine:
    """Losses of a coordinate probe. A subclass sets owner (flat index -> op index), routes (op index -> Route),
    ops, input_name, target_name, memory_bytes, sample_bytes, and implements base(), scores(), owner_losses()."""
    taken = None
    input_dtype = np.float32  # the model input's own type (float16 for fp16 models)

    def direction_losses(self, params, probe, a0, y):
        raise Unsupported("direction probes")

    def losses(self, params, probe, inputs, targets):
        if self.taken is None:
            self.taken = Counter()  # probe rows evaluated per path, counted as they run
        if not isinstance(probe, CoordinateProbe):
            out = self.direction_losses(params, probe, inputs[self.input_name], targets[self.target_name])
            self.taken[Path.PREFIX] += len(probe)
            return out
        x = np.ascontiguousarray(params, np.float32)
        a0 = np.ascontiguousarray(inputs[self.input_name], self.input_dtype)
        y = targets[self.target_name]
        owners = self.owner[probe.index]
        acts = self.base(x, a0, np.unique(owners))
        out = np.empty(len(probe))
        base_rows = probe.delta == 0
        if base_rows.any():
            out[base_rows] = self.sample_losses(self.scores(acts), y).mean()
        rows = np.flatnonzero(~base_rows)
        owners = owners[rows]
        # rows per chunk, so that blocks, responses and dense copies of a chunk stay under the cap
        chunk = int(max(1, self.memory_bytes // (16 * self.sample_bytes * len(a0))))
        for j in np.unique(owners):
            layer_rows = rows[owners == j]
            for s in range(0, len(layer_rows), chunk):
                sel = layer_rows[s:s + chunk]
                out[sel] = self.owner_losses(j, x, acts, a0, probe.index[sel], probe.delta[sel].astype(np.float32), y)
                self.taken[self.routes[j].path] += len(sel)
        return out

    def tensor_routes(self):
        """{trainable tensor: Route}."""
        return {e["name"]: self.routes[j] for j, op in enumerate(self.ops) for e in op.params.values()}

    def tensor_paths(self):
        """{trainable tensor: "engine", "stacked: <ops>", "generic: <ops> (<why>)" or "device: <op>"}."""
        return {name: str(route) for name, route in self.tensor_routes().items()}

    def roles_of(self, op, index):
        """(role, entry, mask of the rows of `index` in that role's tensor) for each of the op's tensors."""
        for role, entry in op.params.items():
            mine = (index >= entry["offset"]) & (index < entry["offset"] + entry["size"])
            if mine.any():
                yield role, entry, mine
