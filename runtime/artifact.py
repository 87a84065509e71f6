"""Load an artifact folder and evaluate its loss through onnxruntime (no torch)."""
import sys
import time
from pathlib import Path

import numpy as np

from .memory import trim_heap, Trimmer, return_freed_memory
from .sessions import active_device, make_session
from . import manifest as manifest_mod
from .errors import EdgezoError, check
from .files import load_params
from .probes import CoordinateProbe, perturbed

ENGINES = ("auto", "batched", "naive")
# --engine auto in a training run drops the engine where its probes 2-5 take over 1.2x naive's time on average
# (raced where they take >= 0.1 s). A cycle's first probes are its dearest (early layers: long suffixes, sessions
# made and run for the first time): on MobileNetV3's norms+biases they took 0.85x naive while the cycle ran at 0.25x
RACE_CALLS, RACE_MARGIN, RACE_MIN_SECONDS = (2, 5), 1.2, 0.1
BACKENDS = {}  # name -> callable(path, device, threads) returning an Artifact; runtime/ imports none of them
NP_DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32,
             "float16": np.float16}


class Artifact:
    """An exported model: `initial_params()`, `loss(...)`, `losses(...)`, `outputs(...)`."""

    def __init__(self, path, device="auto", threads=None, engine="auto", engine_memory_mb=256, lean_memory=False):
        self.path = Path(path)
        check(self.path.is_dir(), f"artifact {self.path} is not a folder")
        self.manifest = manifest_mod.read(self.path / "manifest.json")
        for key, name in self.manifest["files"].items():
            if key in ("loss", "inference", "params") and not (self.path / name).is_file():
                raise EdgezoError(f"artifact {self.path} is missing {name} (manifest files.{key})")
        self.num_params = self.manifest["num_params"]
        self.input_names = [v["name"] for v in self.manifest["inputs"]]
        self.target_names = [v["name"] for v in self.manifest["targets"]]
        self.threads = threads
        self._session = make_session(self.file("loss"), device, threads)
        self.device = active_device(self.session)
        self._check_graph()
        self.output_names = [o.name for o in self.session.get_outputs()]
        check(engine in ENGINES, f"--engine must be one of {list(ENGINES)}, got {engine!r}")
        check(engine_memory_mb > 0, f"--engine-memory-mb must be > 0, got {engine_memory_mb}")
        self.engine_name, self.engine_memory_mb = engine, engine_memory_mb
        if lean_memory:  # freed activations go back to the OS at once: a lower peak, some speed lost
            check(return_freed_memory(), "--lean-memory needs glibc's mallopt (Linux); this C library has none")
        self._engine, self.engine_note, self._no_engine = None, None, False
        self.trim = Trimmer()

    def fast_engine(self):
        """The graph engine for this loss graph, or None (with engine_note saying why) where it does not apply."""
        if self._engine is not None or self.engine_name == "naive" or self._no_engine:
            return self._engine
        from .engine import GraphEngine, Unsupported
        try:
            self._engine = GraphEngine.build(self.file("loss"), self.manifest, propagate=self.engine_name == "auto",
                                             memory_mb=self.engine_memory_mb, threads=self.threads,
                                             device=self.device)
        except Exception as e:  # Unsupported, or onnxruntime refusing a cut: building never ends a run
            why = str(e) if isinstance(e, Unsupported) else \
                f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
            if self.engine_name == "batched":
                raise EdgezoError(f"--engine batched does not apply to {self.file('loss')}: {why}") from None
            self.engine_note = f"fast engine not used ({why}); evaluating one perturbation per call"
            self._no_engine = True
            return None
        if self.device != "cpu":  # kernels as ONNX graphs, activations and copies on the device
            from .engine import DeviceEngine
            self._engine = DeviceEngine(self._engine, self.device)
        self.engine_note = _paths_note(self._engine.tensor_routes())
        if self._engine_evaluates(self._engine):
            self._session = None  # the engine's sessions answer steps and evaluations (2.3 MiB less on a
            trim_heap()  # MobileNetV3 head); a naive evaluation makes it again
        return self._engine

    def _engine_evaluates(self, engine):
        """Whether the engine's base session computes the model output the loss reads (then it answers outputs())."""
        return getattr(engine, "subgraphs", None) is not None and engine.output == self.output_names[1]

    @property
    def session(self):
        if self._session is None:
            self._session = make_session(self.file("loss"), self.device, self.threads)
        return self._session

    def tensor_paths(self):
        """{trainable tensor: the path its steps use} (metrics.json's engine_paths)."""
        engine = self.fast_engine()
        if engine is None:
            return {e["name"]: "naive" for e in self.manifest["trainable"]}
        return engine.tensor_paths()

    def file(self, key):
        return self.path / self.manifest["files"][key]

    @property
    def is_classifier(self):
        return self.manifest["loss"]["kind"] == "cross_entropy"

    def _check_graph(self):
        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        wanted = [self.manifest["params_input"]] + self.input_names + self.target_names
        missing = [n for n in wanted if n not in graph_inputs]
        if missing:
            raise EdgezoError(f"{self.file('loss')}: has no graph input {missing[0]!r} named in manifest.json")
        shape = graph_inputs[self.manifest["params_input"]].shape
        if shape != [self.num_params]:
            raise EdgezoError(f"{self.file('loss')}: params input has shape {shape}, manifest.json num_params "
                              f"is {self.num_params}")

    def initial_params(self):
        path = self.file("params")
        return load_params(path, self.num_params, wants="manifest.json").copy()

    def feeds(self, inputs, targets=None):
        """Name -> array for the graph, from arrays, tuples or dicts of arrays."""
        feed = {}
        groups = [(self.manifest["inputs"], inputs)]
        if targets is not None:
            groups.append((self.manifest["targets"], targets))
        for specs, values in groups:
            if isinstance(values, dict):
                values = [values.get(s["name"]) for s in specs]
            elif not isinstance(values, (list, tuple)):
                values = [values]
            check(len(values) == len(specs), f"expected {len(specs)} arrays for {[s['name'] for s in specs]}, "
                                             f"got {len(values)}")
            for spec, value in zip(specs, values):
                check(value is not None, f"missing array {spec['name']!r}")
                feed[spec["name"]] = np.ascontiguousarray(value, dtype=NP_DTYPES[spec["dtype"]])
        return feed

    fixed_batch = None  # onnxruntime graphs take any batch size
    backend = "onnxruntime"

    _params_on_device = None

    def _run(self, params, feed, outputs=("loss",)):
        params = np.ascontiguousarray(params, dtype=np.float32)
        if self.device == "cuda":
            return self._run_bound(params, feed, outputs)
        feed[self.manifest["params_input"]] = params
        return self.session.run(list(outputs), feed)

    def _run_bound(self, params, feed, outputs):
        """CUDA: the params live in one device buffer, updated in place; inputs and outputs are bound."""
        import onnxruntime as ort
        if self._params_on_device is None:
            self._params_on_device = ort.OrtValue.ortvalue_from_numpy(params, "cuda", 0)
        else:
            self._params_on_device.update_inplace(params)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.manifest["params_input"], self._params_on_device)
        for name, value in feed.items():
            if name != self.manifest["params_input"]:
                binding.bind_cpu_input(name, value)
        for name in outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _check_params(self, params):
        ok = isinstance(params, np.ndarray) and params.shape == (self.num_params,)
        check(ok, f"params must be a float32 array of shape ({self.num_params},), got "
                  f"{getattr(params, 'shape', type(params).__name__)}")

    def loss(self, params, inputs, targets):
        self._check_params(params)
        return float(self._run(params, self.feeds(inputs, targets))[0])

    def outputs(self, params, inputs, targets):
        """(loss, model output) at params. Where the engine is built and the model output is the tensor the loss
        reads, the steps' base session answers (equal within float rounding): the main session then holds no
        arena of a forward's activations beside the engine's."""
        self._check_params(params)
        feed, engine = self.feeds(inputs, targets), self._engine
        if self._engine_evaluates(engine):
            return engine.evaluate(np.ascontiguousarray(params, np.float32), feed[self.input_names[0]],
                                   feed[self.target_names[0]])
        loss, out = self._run(params, feed, ("loss", self.output_names[1]))
        return float(loss), out

    def losses(self, params, probe, inputs, targets):
        """One loss per probe row, in row order, by the fastest exact path (see runtime/engine.py)."""
        out = self._losses(params, probe, inputs, targets)
        self.trim()  # what the step freed goes back to the OS (memory.Trimmer)
        return out

    def _losses(self, params, probe, inputs, targets):
        self._check_params(params)
        feed = self.feeds(inputs, targets)
        engine = self.fast_engine()
        if engine is not None and isinstance(probe, CoordinateProbe):  # delta propagation, stacked or generic
            self.engine_calls += 1
            if RACE_CALLS[0] <= self.engine_calls <= RACE_CALLS[1] and self.engine_name == "auto" and self.race:
                return self._race(engine, params, probe, feed)
            return engine.losses(params, probe, feed, feed)
        if engine is not None and self._prefix_for_directions:
            from .engine import Unsupported
            try:  # a direction probe: the frozen part once, the rest once per direction
                return engine.losses(params, probe, feed, feed)
            except Unsupported:
                self._prefix_for_directions = False
        self.naive_rows += len(probe)
        return self.naive_losses(params, probe, feed)

    naive_rows = 0  # probe rows evaluated by the naive path
    _prefix_for_directions = True
    engine_calls, engine_seconds = 0, 0.0
    race = False  # training runs (run.prepare, the profiler) set it: the engine must beat naive to stay

    def _race(self, engine, params, probe, feed):
        """The engine's probes 2-5 against the naive path on the 5th: where the
        engine is clearly slower (deep coordinates whose suffixes cost nearly a forward each, or a tight
        --engine-memory-mb), training goes on naive, with less memory, and the run's note says so."""
        start = time.perf_counter()
        losses = engine.losses(params, probe, feed, feed)
        self.engine_seconds += time.perf_counter() - start
        if self.engine_calls < RACE_CALLS[1]:
            return losses
        fast = self.engine_seconds / (RACE_CALLS[1] - RACE_CALLS[0] + 1)  # making a layer's sessions included
        if fast < RACE_MIN_SECONDS:  # a fast step either way: not worth a naive evaluation
            return losses
        start = time.perf_counter()
        naive = self.naive_losses(params, probe, feed)
        slow = time.perf_counter() - start
        if fast < RACE_MARGIN * slow:
            return losses
        self._engine, self._no_engine = None, True
        self.engine_note = (f"fast engine not used: slower than the naive path here ({1e3 * fast:.0f} vs "
                            f"{1e3 * slow:.0f} ms for a probe of {len(probe)} rows, --engine-memory-mb "
                            f"{self.engine_memory_mb:g}); evaluating one perturbation per call")
        print(f"edgezo: {self.engine_note}", file=sys.stderr)
        self.naive_rows += len(probe)
        return naive

    def paths_taken(self):
        """{path: probe rows evaluated along it so far} ("engine", "stacked", "generic", "device", "naive"), as
        the evaluations ran, not as planned."""
        taken = {path.value: rows for path, rows in (getattr(self._engine, "taken", None) or {}).items()}
        if self.naive_rows:
            taken["naive"] = self.naive_rows
        return taken

    def naive_losses(self, params, probe, feed):
        """One runtime call per probe row: the reference every faster path must match."""
        base = np.asarray(params, dtype=np.float32)
        if isinstance(probe, CoordinateProbe):
            x = base.copy()
            out = np.empty(len(probe))
            for p, (i, d) in enumerate(zip(probe.index, probe.delta)):
                x[i] = base[i] + d
                out[p] = self._run(x, feed)[0]
                x[i] = base[i]
            return out
        return np.array([self._run(perturbed(base, probe, p), feed)[0] for p in range(len(probe))])


def _paths_note(routes):
    """One line: how many trainable tensors take each engine path, and every op that decided it (None where all
    take the engine's kernels)."""
    from .engine import Path

    def of(path):
        return {name: route for name, route in routes.items() if route.path is path}

    def ops(group):
        found = sorted({op for route in group.values() for op in route.detail.split(", ")},
                       key=lambda op: ("(" not in op, op))  # the ones that say why first
        return ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    generic, stacked, alone = of(Path.GENERIC), of(Path.STACKED), of(Path.OP_STACKED)
    if not generic and not stacked and not alone:
        return None
    line = (f"engine paths: {len(routes) - len(generic) - len(stacked) - len(alone)} of {len(routes)} trainable "
            "tensors all in the engine's kernels")
    if stacked:
        line += f", {len(stacked)} with the rest stacked in onnxruntime (past {ops(stacked)})"
    if alone:
        line += (f", {len(alone)} with their op run alone per perturbation and the rest stacked (the op "
                 f"computes its weights from the params: {ops(alone)})")
    if generic:
        names = ", ".join(list(generic)[:4]) + (", ..." if len(generic) > 4 else "")
        line += f", {len(generic)} one onnxruntime call per perturbation from their op's input ({names}: {ops(generic)})"
    return line


def load_artifact(path, device="auto", backend="onnxruntime", threads=None, engine="auto", engine_memory_mb=256,
                  lean_memory=False):
    """Open an artifact folder for training. `device`: auto|cpu|cuda; `engine`: auto|batched|naive;
    `lean_memory`: return freed memory to the OS at once (runtime.memory.return_freed_memory)."""
    if backend in BACKENDS:  # registered from outside runtime/ (edgezo/__init__.py: ExecuTorch, which loads torch)
        return BACKENDS[backend](path, device=device, threads=threads)
    if backend != "onnxruntime":
        raise EdgezoError(f"--backend must be one of {['onnxruntime', *BACKENDS]}, got {backend!r}")
    return Artifact(path, device=device, threads=threads, engine=engine, engine_memory_mb=engine_memory_mb,
                    lean_memory=lean_memory)
