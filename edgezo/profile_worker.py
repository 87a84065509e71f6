"""One profiled method in a fresh process: `python -m edgezo.profile_worker '<json config>'`.

Prints one JSON line: the post-import baseline RSS, the peak (VmHWM) and its rise, the time per
step and, on CUDA / Jetson, device-level numbers. Methods: inference, cocd (edgezo, torch-free),
torch-cocd (the authors' eager in-place loop), sgd, momentum, adam (torch autograd).
"""
import json
import sys
import threading
import time

TORCH_METHODS = ("torch-cocd", "sgd", "momentum", "adam")


class MemAvailableSampler:
    """Jetson (GPU memory is system RAM, no NVML memory query): samples /proc/meminfo for the largest drop of
    MemAvailable and the largest rise of NvMapMemUsed (GPU allocations through NvMap)."""

    def __init__(self, period=0.01):
        from edgezo.devices.detect import parse_meminfo
        self.parse, self.period = parse_meminfo, period
        first = self.sample()
        self.start = dict(first)
        self.low_available, self.high_nvmap = first.get("MemAvailable"), first.get("NvMapMemUsed")
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sample(self):
        try:
            with open("/proc/meminfo") as f:
                return self.parse(f.read())
        except OSError:
            return {}

    def _run(self):
        while self.running:
            now = self.sample()
            if now.get("MemAvailable") is not None and self.low_available is not None:
                self.low_available = min(self.low_available, now["MemAvailable"])
            if now.get("NvMapMemUsed") is not None and self.high_nvmap is not None:
                self.high_nvmap = max(self.high_nvmap, now["NvMapMemUsed"])
            time.sleep(self.period)

    def stop(self):
        """{memavailable_drop_mb, nvmap_used_rise_mb} (None where the field is absent)."""
        self.running = False
        self.thread.join()
        drop = None if self.low_available is None else self.start["MemAvailable"] - self.low_available
        rise = None if self.high_nvmap is None else self.high_nvmap - self.start["NvMapMemUsed"]
        return {"memavailable_drop_mb": drop, "nvmap_used_rise_mb": rise}


def _fixed(spec):
    """A value's per-sample shape, with 8 for its dynamic non-batch dims (a sequence length, an image width)."""
    return [d if isinstance(d, int) else 8 for d in spec["shape"][1:]]


def batch(manifest, size, rng):
    import numpy as np
    arrays = {}
    for spec in manifest["inputs"]:
        arrays[spec["name"]] = rng.standard_normal((size, *_fixed(spec))).astype(spec["dtype"])
    for spec in manifest["targets"]:
        if spec["dtype"].startswith("int"):
            arrays[spec["name"]] = rng.integers(0, manifest["loss"]["num_classes"], size)
        else:
            arrays[spec["name"]] = rng.standard_normal((size, *_fixed(spec))).astype(spec["dtype"])
    return arrays


def run_edgezo(cfg, manifest, data, mark):
    from edgezo.runtime import CoCD, load_artifact
    from edgezo.runtime.train import steps
    artifact = load_artifact(cfg["artifact"], device=cfg["device"], threads=cfg.get("threads"),
                             engine_memory_mb=cfg["engine_memory_mb"], lean_memory=cfg.get("lean_memory", False))
    artifact.race = True  # as edgezo train runs it
    if cfg["method"] == "inference":
        from edgezo.runtime.sessions import make_session
        session = make_session(artifact.file("inference"), cfg["device"], cfg.get("threads"))
        feed = {n: data[n] for n in artifact.input_names}
        mark()
        for _ in range(cfg["steps"]):
            session.run(None, feed)
        return {}
    params = artifact.initial_params()
    memory = max(1, int(round(cfg["memory_fraction"] * params.size)))
    opt = CoCD(params, lr=1e-4, eps=1e-2, budget=cfg["budget"], memory=memory)
    mark()
    for _ in steps(artifact, opt, ((data, data) for _ in range(cfg["steps"]))):
        pass
    return {"memory": memory, "engine": "naive" if artifact.fast_engine() is None else artifact.engine_name}


def run_torch(cfg, manifest, data, mark):
    import numpy as np
    import torch
    from edgezo.exporters.torch_export import LOSSES, load_reference
    from edgezo.reference import make_torch_optimizer
    device = "cuda" if cfg["device"] == "cuda" else "cpu"
    module, _ = load_reference(cfg["artifact"])
    module = module.to(device)
    loss_fn = LOSSES[manifest["loss"]["kind"]]
    inputs = [torch.from_numpy(np.asarray(data[v["name"]])).to(device) for v in manifest["inputs"]]
    targets = [torch.from_numpy(np.asarray(data[v["name"]])).to(device) for v in manifest["targets"]]
    params = [dict(module.named_parameters())[e["name"]] for e in manifest["trainable"]]
    mark()
    if cfg["method"] == "torch-cocd":  # the reference: in place +eps, -2eps, +eps, one forward each
        sizes = np.cumsum([0] + [p.numel() for p in params])
        coordinate = 0
        with torch.no_grad():
            for _ in range(cfg["steps"]):
                for _ in range(cfg["budget"]):
                    t = int(np.searchsorted(sizes, coordinate, side="right") - 1)
                    flat, j = params[t].view(-1), coordinate - int(sizes[t])
                    flat[j] += 1e-2
                    loss_fn(module(*inputs), *targets)
                    flat[j] -= 2e-2
                    loss_fn(module(*inputs), *targets)
                    flat[j] += 1e-2
                    coordinate = (coordinate + 1) % int(sizes[-1])
        return {}
    opt = make_torch_optimizer(cfg["method"], params, 1e-4)
    for _ in range(cfg["steps"]):
        opt.zero_grad()
        loss_fn(module(*inputs), *targets).backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
        return {"torch_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2 ** 20,
                "torch_peak_reserved_mb": torch.cuda.max_memory_reserved() / 2 ** 20}
    return {}


def main():
    cfg = json.loads(sys.argv[1])
    import numpy as np  # noqa: F401  (counted in the baseline like the other imports)
    if cfg["method"] in TORCH_METHODS:
        import torch  # noqa: F401
    else:
        from edgezo.runtime.memory import import_runtime
        import_runtime()
    from edgezo.devices.detect import jetson, nvml_process_mb, nvml_used_mb
    from edgezo.devices.memory import peak_rss_mb, rss_mb
    from edgezo.runtime.manifest import read
    baseline = rss_mb()
    sampler = MemAvailableSampler() if jetson() else None
    nvml_before = nvml_used_mb() if cfg["device"] == "cuda" else None
    manifest = read(f"{cfg['artifact']}/manifest.json")
    data = batch(manifest, cfg["batch_size"], np.random.default_rng(0))
    times = {}

    def mark():
        times["setup_rss_mb"] = rss_mb()
        times["start"] = time.perf_counter()

    runner = run_torch if cfg["method"] in TORCH_METHODS else run_edgezo
    extra = runner(cfg, manifest, data, mark)
    seconds = time.perf_counter() - times["start"]
    result = {"method": cfg["method"], "baseline_mb": baseline, "setup_rss_mb": times["setup_rss_mb"],
              "peak_rss_mb": peak_rss_mb(), "rise_mb": peak_rss_mb() - baseline,
              "seconds_per_step": seconds / cfg["steps"], "torch_imported": sys.modules.get("torch") is not None,
              **extra}
    if nvml_before is not None:
        after = nvml_used_mb()
        result["nvml_used_rise_mb"] = None if after is None else after - nvml_before
        result["nvml_process_mb"] = nvml_process_mb()  # desktop GPUs: this process's GPU memory
    if sampler:  # Jetson: RSS plus the NvMap (GPU) allocations, labelled as such, and the MemAvailable drop
        result.update(sampler.stop())
        if result["nvmap_used_rise_mb"] is not None:
            result["jetson_rss_plus_nvmap_mb"] = result["peak_rss_mb"] + result["nvmap_used_rise_mb"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
