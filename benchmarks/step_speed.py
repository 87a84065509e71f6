"""ms per CoCD step: edgezo's engine (auto, batched) vs the naive path vs an eager torch loop as the
authors' reference does it (in place +eps, -2eps, +eps; one forward each), measured side by side.

The engine paths are timed on every step of one full coordinate cycle (each layer counts by its
share of the coordinates); the naive path and the torch reference, whose cost does not depend on
the step, on steps spread across the cycle and a sample of probe rows, scaled to 2B rows (said so in
the output). ResNet-20's engine paths (a cycle is 133 steps of 4,096 rows) are timed like the naive
path, on the spread steps and a row sample. Writes benchmarks/results/step_speed.json.

Usage: python benchmarks/step_speed.py [--models mlp cnn resnet20] [--steps 12]
Run it alone: other work on a 2-core machine distorts timings.
"""
import argparse
import sys
import time

import numpy as np

from common import RESULTS, builtin_artifact, write_json

CASES = {  # name: (built-in model, budget B, batch, input shape, classes or None for 7 regression targets,
    #        engine rows timed per step or None for the full cycle)
    "mlp": ("sarcos-mlp", 64, 64, (21,), None, None),
    "cnn": ("mnist-cnn", 256, 128, (1, 28, 28), 10, None),
    "resnet20": ("resnet20", 2048, 128, (3, 32, 32), 10, 64),
}
TARGET_MS = {"mlp": 1.0, "cnn": 60.0}


def timed(fn, repeat=1):
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def sample_rows(probe, rows):
    """The first `rows` rows of a probe (for timing slow paths on a sample)."""
    from edgezo.runtime.optim import CoordinateProbe
    return CoordinateProbe(probe.index[:rows], probe.delta[:rows])


def torch_reference_ms(artifact_dir, probes, x, y, classes, rows):
    """The reference's eager loop: per coordinate, +eps, forward, -2eps, forward, +eps."""
    import torch
    from edgezo.exporters.torch_export import load_reference
    torch.set_num_threads(2)
    module, manifest = load_reference(artifact_dir)
    params = [dict(module.named_parameters())[e["name"]] for e in manifest["trainable"]]
    sizes = np.cumsum([0] + [p.numel() for p in params])
    loss_fn = torch.nn.functional.cross_entropy if classes else torch.nn.functional.mse_loss
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    total = 0.0
    with torch.no_grad():
        for probe in probes:
            coords = probe.index[:len(probe) // 2][:rows // 2]
            eps = float(probe.delta[0])

            def run():
                for i in coords:
                    t = int(np.searchsorted(sizes, i, side="right") - 1)
                    flat = params[t].view(-1)
                    j = int(i - sizes[t])
                    flat[j] += eps
                    loss_fn(module(xt), yt)
                    flat[j] -= 2 * eps
                    loss_fn(module(xt), yt)
                    flat[j] += eps
            total += timed(run) * (len(probe) / (2 * len(coords)))
    return 1000 * total / len(probes)


def bench(name, steps, sample):
    from edgezo.runtime import EdgezoError, load_artifact
    from edgezo.runtime.optim import CoCD
    model, budget, batch, shape, classes, engine_rows = CASES[name]
    path = builtin_artifact(model)
    rng = np.random.default_rng(0)
    x = rng.random((batch, *shape), dtype=np.float32)
    y = rng.integers(0, classes, batch) if classes else rng.standard_normal((batch, 7)).astype(np.float32)
    arts = {e: load_artifact(path, device="cpu", threads=2, engine=e) for e in ("auto", "batched", "naive")}
    params = arts["naive"].initial_params()
    opt = CoCD(params, lr=0.0, eps=1e-2, budget=budget)
    cycle = -(-params.size // budget)
    def probes_at(step_list):
        out = []
        for step in step_list:
            opt.refreshed = int(step) * budget
            out.append(opt.ask())
            opt.discard()
        return out
    probes = probes_at(np.linspace(0, cycle - 1, min(steps, cycle)).astype(int))
    full_cycle = probes_at(range(cycle))
    result = {"model": model, "num_params": int(params.size), "budget": budget, "batch": batch,
              "steps_timed": len(probes), "cycle_steps": cycle}
    for engine, art in arts.items():
        try:
            usable = engine == "naive" or art.fast_engine() is not None
            note = art.engine_note
        except EdgezoError as e:
            usable, note = False, str(e)
        if not usable:
            result[f"{engine}_ms"], result[f"{engine}_note"] = None, note
            print(f"  {name} {engine:8s} not applicable: {note}", flush=True)
            continue
        rows = sample if engine == "naive" else engine_rows
        art.losses(params, sample_rows(probes[0], 8), x, y)  # warm up
        timed_probes = probes if rows else full_cycle
        total = 0.0
        for probe in timed_probes:
            p = sample_rows(probe, rows) if rows and rows < len(probe) else probe
            total += timed(lambda: art.losses(params, p, x, y)) * len(probe) / len(p)
        result[f"{engine}_ms"] = 1000 * total / len(timed_probes)
        print(f"  {name} {engine:8s} {result[f'{engine}_ms']:10.2f} ms/step"
              + (f" (from {rows} of {len(probes[0])} rows per step)" if rows and rows < len(probes[0]) else ""),
              flush=True)
    result["torch_reference_ms"] = torch_reference_ms(path, probes, x, y, classes, sample)
    print(f"  {name} torch ref {result['torch_reference_ms']:10.2f} ms/step (eager, in place; "
          f"{min(sample, 2 * budget)} of {2 * budget} rows per step timed)", flush=True)
    best = min(v for k, v in result.items() if k.endswith("_ms") and v is not None and k != "torch_reference_ms")
    result["best_ms"] = best
    result["speedup_vs_torch_reference"] = result["torch_reference_ms"] / best
    result["speedup_vs_naive"] = result["naive_ms"] / best
    if name in TARGET_MS:
        result["target_ms"] = TARGET_MS[name]
    return result


def previous_results():
    import json
    path = RESULTS / "step_speed.json"
    return json.loads(path.read_text()) if path.exists() else {}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--steps", type=int, default=12, help="steps spread across the coordinate cycle")
    parser.add_argument("--sample", type=int, default=128, help="probe rows timed per step on the slow paths")
    args = parser.parse_args()
    results = {}
    for name in args.models:
        print(f"{name}:", flush=True)
        results[name] = bench(name, args.steps, args.sample)
    print(f"\n{'model':<9} {'auto ms':>9} {'batched':>9} {'naive':>9} {'torch ref':>10} {'vs ref':>8} {'vs naive':>9}")
    for name, r in results.items():
        fmt = lambda v: f"{v:9.2f}" if v is not None else f"{'n/a':>9}"
        print(f"{name:<9} {fmt(r['auto_ms'])} {fmt(r['batched_ms'])} {fmt(r['naive_ms'])} "
              f"{r['torch_reference_ms']:10.2f} {r['speedup_vs_torch_reference']:7.1f}x {r['speedup_vs_naive']:8.1f}x")
    write_json("step_speed", {**previous_results(), **results})  # models run earlier keep their rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
