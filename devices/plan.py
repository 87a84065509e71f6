"""The memory-budget planner: what fits a device, and the peak RSS it will take. No torch.

Model of the peak resident memory of `edgezo train` (CoCD, onnxruntime):

    peak = baseline + overhead + all activations(batch) + largest adjacent pair(batch)
           + alpha x min(engine cap, engine need(batch))
           + 4 m (gradient buffer) + 8 n (params and the divergence guard's snapshot)

`baseline` is the process after its imports, `overhead` what the onnxruntime session and engine
set-up add, `alpha` how much of the engine's chunk allowance is really resident. The three are
measured on this machine by short calibration runs (fresh subprocesses, as `edgezo profile` does);
the activations come from ONNX shape inference of the artifact's inference graph.
"""
import json
import subprocess
import sys
from pathlib import Path

from ..runtime.errors import EdgezoError, check
from .detect import JETSON_RESERVED_MB, PROFILES, meminfo_mb

MIB = 2 ** 20
CALIBRATION_BATCH = 8


def activations_mb(artifact_dir, manifest, batch):
    """(all activations, the largest adjacent pair, the widest per-sample one) in MiB at this batch."""
    import numpy as np
    import onnx
    model = onnx.load(str(Path(artifact_dir) / manifest["files"]["inference"]))
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    inferred = onnx.shape_inference.infer_shapes(model)
    sizes = [4 * batch * int(np.prod(v["shape"][1:])) for v in manifest["inputs"]]
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = value.type.tensor_type
        if t.elem_type == onnx.TensorProto.FLOAT and all(d.HasField("dim_value") for d in t.shape.dim):
            sizes.append(4 * int(np.prod([d.dim_value for d in t.shape.dim])))
    pair = max(a + b for a, b in zip(sizes, sizes[1:])) if len(sizes) > 1 else sizes[0]
    return sum(sizes) / MIB, pair / MIB, max(sizes) / batch / MIB


def engine_need_mb(width_mb, batch, budget):
    """What the engine would hold for all 2B copies at once (its own per-copy estimate)."""
    return 2 * budget * batch * width_mb * 16


def measure(artifact_dir, batch, budget, engine_mb, steps=3, memory_fraction=1.0):
    """Peak RSS and post-import baseline of a short `edgezo train`-like run in a fresh process."""
    config = {"method": "cocd", "artifact": str(Path(artifact_dir).resolve()), "batch_size": batch, "steps": steps,
              "device": "cpu", "budget": budget, "memory_fraction": memory_fraction, "engine_memory_mb": engine_mb,
              "threads": 2}
    proc = subprocess.run([sys.executable, "-m", "edgezo.profile_worker", json.dumps(config)], capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise EdgezoError(f"calibration run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Planner:
    def __init__(self, artifact_dir, budget=64):
        from ..runtime.manifest import read
        self.artifact_dir, self.budget = Path(artifact_dir), budget
        self.manifest = read(self.artifact_dir / "manifest.json")
        self.n = self.manifest["num_params"]
        self._activations = {}
        self.calibrate()

    def activations(self, batch):
        if batch not in self._activations:
            self._activations[batch] = activations_mb(self.artifact_dir, self.manifest, batch)
        return self._activations[batch]

    def terms(self, batch, memory, engine_mb):
        every, pair, width = self.activations(batch)
        # the engine caches every layer's base output; onnxruntime's arena holds about one adjacent pair
        return {"activations": every + pair, "engine": min(engine_mb, engine_need_mb(width, batch, self.budget)),
                "buffer": 4 * memory / MIB, "params": 8 * self.n / MIB}

    def calibrate(self):
        """baseline, overhead and alpha from two short runs: engine cap 1 MiB and 64 MiB."""
        # a batch at which the engine's need exceeds the larger cap, so the two runs differ by the cap
        per_row = engine_need_mb(self.activations(1)[2], 1, self.budget)
        b = int(min(256, max(CALIBRATION_BATCH, -(-64 // per_row))))
        small, large = measure(self.artifact_dir, b, self.budget, 1), measure(self.artifact_dir, b, self.budget, 64)
        t_small, t_large = self.terms(b, self.n, 1), self.terms(b, self.n, 64)
        span = t_large["engine"] - t_small["engine"]
        self.alpha = max(0.0, (large["peak_rss_mb"] - small["peak_rss_mb"]) / span) if span > 0 else 1.0
        self.baseline = small["baseline_mb"]
        rest = sum(v for k, v in t_small.items() if k != "engine") + self.alpha * t_small["engine"]
        self.overhead = small["peak_rss_mb"] - self.baseline - rest

    def predict(self, batch, memory=None, engine_mb=256):
        memory = self.n if memory is None else memory
        t = self.terms(batch, memory, engine_mb)
        return self.baseline + self.overhead + t["activations"] + self.alpha * t["engine"] + t["buffer"] + t["params"]

    def plan(self, limit_mb, engine_cap_mb=256):
        """The largest batch (then m = n, then the engine chunk) whose predicted peak fits limit_mb."""
        for batch in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
            floor = self.predict(batch, self.n, 0)
            if floor > limit_mb:
                continue
            engine = engine_cap_mb
            if self.alpha > 0:
                engine = min(engine_cap_mb, (limit_mb - floor) / self.alpha)
            engine = max(1.0, float(int(engine)))
            return {"batch_size": batch, "memory": self.n, "engine_memory_mb": engine,
                    "predicted_peak_mb": self.predict(batch, self.n, engine), "limit_mb": limit_mb}
        raise EdgezoError(f"nothing fits in {limit_mb:.0f} MiB: even batch 1 needs "
                          f"{self.predict(1, 1, 1):.0f} MiB predicted")


def target_limit_mb(target, memory_limit_mb=None):
    """The memory training may use on a target profile (board memory less what JetPack holds)."""
    if memory_limit_mb is not None:
        check(memory_limit_mb > 0, f"--memory-limit-mb must be > 0, got {memory_limit_mb}")
        return float(memory_limit_mb)
    if target == "local":
        return meminfo_mb("MemAvailable")
    check(target in PROFILES, f"--target must be 'local' or one of {sorted(PROFILES)}, got {target!r}")
    return PROFILES[target][1] - JETSON_RESERVED_MB
