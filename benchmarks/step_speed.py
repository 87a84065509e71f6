"""ms per CoCD step: edgezo's engine (auto, batched) vs the naive path vs an eager torch loop as the
authors' reference does it (in place +eps, -2eps, +eps; one forward each), measured side by side.

Deployed architectures (benchmarks/deployed.py, imported with export-onnx; CoCD B = 16): MobileNetV3-small-like
at 96 px batch 32 and 224 px batch 16, ResNet-18-like at 64 px batch 32, a 2-block transformer encoder at batch
32, each with the head (the last Linear) or the last block and head trainable: auto, batched, naive and one
plain forward of the deployed model (onnxruntime), on steps spread across the cycle (naive on a row sample).
Targets: head steps >= 10x faster than naive and <= 3 forwards; last-block steps >= 3x faster than naive.
--baseline COMMIT compares the engine (auto) with that commit's code instead: the paper's MLP and CNN over a full
cycle, ResNet-20 on 3 spread steps, deployed rows on 24; baseline and this tree alternately, --rounds times each,
every run in its own process (the baseline with its own artifacts); medians, each side's spread, their ratio
(benchmarks/results/step_speed_baseline.json).

The engine paths are timed on every step of one full coordinate cycle (each layer counts by its
share of the coordinates); the naive path and the torch reference, whose cost does not depend on
the step, on steps spread across the cycle and a sample of probe rows, scaled to 2B rows (said so in
the output). ResNet-20's engine paths (a cycle is 133 steps of 4,096 rows) are timed like the naive
path, on the spread steps and a row sample. Writes benchmarks/results/step_speed.json.

Usage: python benchmarks/step_speed.py [--models mlp cnn resnet20 mnv3-96-head ...] [--steps 12]
       python benchmarks/step_speed.py --models mlp cnn resnet20 mnv3-96-head --baseline 5af24f5 --rounds 3
Run it alone: other work on a 2-core machine distorts timings.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

from common import RESULTS, builtin_artifact, write_json

CASES = {  # name: (built-in model, budget B, batch, input shape, classes or None for 7 regression targets,
    #        engine rows timed per step or None for the full cycle)
    "mlp": ("sarcos-mlp", 64, 64, (21,), None, None),
    "cnn": ("mnist-cnn", 256, 128, (1, 28, 28), 10, None),
    "resnet20": ("resnet20", 2048, 128, (3, 32, 32), 10, 64),
}
TARGET_MS = {"mlp": 1.0, "cnn": 60.0}
DEVICE = ["cpu"]  # --device, for the deployed models
DEVICE_ENGINE = [False]  # --device-engine
DEPLOYED = {  # name: (model, its size settings, selection, batch)
    "mnv3-96-head": ("mobilenetv3_small", dict(side=96), "head", 32),
    "mnv3-96-block": ("mobilenetv3_small", dict(side=96), "block", 32),
    "mnv3-224-head": ("mobilenetv3_small", dict(side=224), "head", 16),
    "mnv3-224-block": ("mobilenetv3_small", dict(side=224), "block", 16),
    "resnet18-64-head": ("resnet18", dict(side=64), "head", 32),
    "resnet18-64-block": ("resnet18", dict(side=64), "block", 32),
    "transformer-head": ("transformer", {}, "head", 32),
    "transformer-block": ("transformer", {}, "block", 32),
}


def timed(fn, repeat=1):
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def sample_rows(probe, rows):
    """The first `rows` rows of a probe (for timing slow paths on a sample)."""
    from edgezo.runtime.optim import CoordinateProbe
    return CoordinateProbe(probe.index[:rows], probe.delta[:rows])


def step_ms(art, params, warm, timed_probes, rows, x, y, label):
    """ms per step over timed_probes (each on `rows` of its rows, scaled to all of them where given). Each step
    is timed after an untimed call of the same step (2 rows): the cut sessions a layer's steps use are made on
    its first step and reused by the next ones (n_layer / B steps per cycle), which sampled steps would miss."""
    for probe in warm:
        art.losses(params, sample_rows(probe, 2), x, y)
    total = 0.0
    for probe in timed_probes:
        p = sample_rows(probe, rows) if rows and rows < len(probe) else probe
        art.losses(params, sample_rows(probe, 2), x, y)
        total += timed(lambda: art.losses(params, p, x, y)) * len(probe) / len(p)
    ms = 1000 * total / len(timed_probes)
    full = len(timed_probes[0])
    print(f"  {label} {ms:10.2f} ms/step" + (f" (from {rows} of {full} rows per step)" if rows and rows < full else ""),
          flush=True)
    return ms


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
    model, budget, batch, shape, classes, engine_rows = CASES[name]
    path = builtin_artifact(model)
    x, y = paper_batch(name)
    arts = {e: load_artifact(path, device="cpu", threads=2, engine=e) for e in ("auto", "batched", "naive")}
    params = arts["naive"].initial_params()
    cycle = -(-params.size // budget)
    probes = probes_at(params, budget, np.linspace(0, cycle - 1, min(steps, cycle)).astype(int))
    full_cycle = probes_at(params, budget, range(cycle))
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
        result[f"{engine}_ms"] = step_ms(art, params, probes, probes if rows else full_cycle, rows, x, y,
                                         f"{name} {engine:8s}")
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


def forward_ms(path, x, repeat=10):
    """One plain forward of the deployed model (inference.onnx) at the batch, onnxruntime, 2 threads."""
    from edgezo.runtime.sessions import make_session
    session = make_session(path / "inference.onnx", DEVICE[0], 2)
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    return 1000 * timed(lambda: session.run(None, feed), repeat)


def bench_deployed(name, steps, sample):
    from common import deployed_artifact
    from edgezo.runtime import load_artifact
    model, size, selection, batch = DEPLOYED[name]
    path = deployed_artifact(model, selection, **size)
    arts = {e: load_artifact(path, device=DEVICE[0], threads=2, engine=e) for e in ("auto", "batched", "naive")}
    shape = arts["naive"].manifest["inputs"][0]["shape"][1:]
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((batch, *shape)).astype(np.float32), rng.integers(0, 10, batch)
    params = arts["naive"].initial_params()
    budget = 16
    cycle = -(-params.size // budget)
    probes = probes_at(params, budget, np.linspace(0, cycle - 1, min(steps, cycle)).astype(int))
    result = {"model": model, "size": size, "selection": selection, "num_params": int(params.size), "budget": budget,
              "batch": batch, "steps_timed": len(probes), "cycle_steps": cycle}
    for engine, art in arts.items():
        if engine != "naive" and art.fast_engine() is None:
            result[f"{engine}_ms"], result[f"{engine}_note"] = None, art.engine_note
            print(f"  {name} {engine:8s} not applicable: {art.engine_note}", flush=True)
            continue
        if engine == "auto":
            result["engine_paths"] = sorted(set(art.tensor_paths().values()))
            result["engine_note"] = art.engine_note
        rows = sample if engine == "naive" else None
        result[f"{engine}_ms"] = step_ms(art, params, probes, probes, rows, x, y, f"{name} {engine:8s}")
    if DEVICE_ENGINE[0] and DEVICE[0] == "cpu":  # the --device cuda design (fused ONNX graphs, IOBinding) here
        from edgezo.runtime.engine import DeviceEngine

        class OnCpu:  # the artifact's interface over the device engine on the CPU provider
            engine = DeviceEngine(arts["auto"].fast_engine(), "cpu")

            def losses(self, params, probe, inputs, targets):
                feed = arts["auto"].feeds(inputs, targets)
                return self.engine.losses(params, probe, feed, feed)
        result["device_engine_cpu_ms"] = step_ms(OnCpu(), params, [], probes, None, x, y, f"{name} device-engine(cpu)")
    result["forward_ms"] = forward_ms(path, x)
    print(f"  {name} forward  {result['forward_ms']:10.2f} ms (one plain forward at batch {batch})", flush=True)
    best = min(v for k, v in result.items() if k in ("auto_ms", "batched_ms") and v is not None)
    result["speedup_vs_naive"] = result["naive_ms"] / result["auto_ms"]
    result["auto_in_forwards"] = result["auto_ms"] / result["forward_ms"]
    result["best_ms"] = best
    result["target"] = ">= 10x naive, <= 3 forwards" if selection == "head" else ">= 3x naive"
    result["target_met"] = bool(result["speedup_vs_naive"] >= 10 and result["auto_in_forwards"] <= 3) \
        if selection == "head" else bool(result["speedup_vs_naive"] >= 3)
    return result


def baseline_tree(commit):
    """`commit`'s code as an importable package (the layout pyproject's package-dir maps), in a temp folder."""
    import shutil
    import subprocess
    import tempfile
    from common import ROOT
    tree = Path(tempfile.mkdtemp(prefix=f"edgezo-{commit}-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    package = tree / "pkg" / "edgezo"
    shutil.copytree(tree / "edgezo", package)
    for sub in ("runtime", "exporters", "devices"):
        shutil.copytree(tree / sub, package / sub)
    return tree


def engine_run(models, tree=None):
    """{model: auto ms per step} from one subprocess: this tree's code, or the baseline tree's (its own
    artifacts, made by its own exporters)."""
    import json
    import os
    import subprocess
    env = dict(os.environ)
    if tree is not None:
        env.update(PYTHONPATH=str(tree / "pkg"), EDGEZO_BENCH_ARTIFACTS=str(tree / "artifacts"))
    proc = subprocess.run([sys.executable, __file__, "--engine-only", "--models", *models], env=env,
                          cwd=tree / "pkg" if tree is not None else Path(__file__).parent, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"--engine-only failed ({'baseline' if tree else 'this tree'}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleaved(commit, models, rounds):
    """Baseline and this tree alternately, `rounds` times each, every run in its own process: per model the
    medians, each side's spread ((max - min) / median), and the ratio of the medians."""
    tree = baseline_tree(commit)
    runs = {"baseline": [], "this tree": []}
    for k in range(rounds):
        for side in ("baseline", "this tree"):
            runs[side].append(engine_run(models, tree if side == "baseline" else None))
            print(f"  round {k + 1}/{rounds} {side}: " + ", ".join(f"{m} {v:.2f}" for m, v in runs[side][-1].items()),
                  flush=True)
    out = {}
    for m in models:
        old, new = (np.array([r[m] for r in runs[side]]) for side in ("baseline", "this tree"))
        spread = max(np.ptp(old) / np.median(old), np.ptp(new) / np.median(new))
        ratio = float(np.median(new) / np.median(old))
        out[m] = {"baseline_ms": old.tolist(), "this_tree_ms": new.tolist(), "baseline_median_ms": float(np.median(old)),
                  "this_tree_median_ms": float(np.median(new)), "ratio": ratio, "spread": float(spread),
                  "within": bool(abs(ratio - 1) <= max(0.10, spread))}
    return out


def engine_ms(name):
    """auto ms per step as --baseline compares it: the paper MLP and CNN over a full cycle, ResNet-20 on 3 steps
    spread over its cycle (64 rows each, scaled to 2B), a deployed model on 24 spread steps."""
    from edgezo.runtime import load_artifact
    if name in ("mlp", "cnn"):
        return cycle_ms(name)
    if name == "resnet20":
        art = load_artifact(builtin_artifact("resnet20"), device="cpu", threads=2, engine="auto")
        x, y = paper_batch(name)
        params = art.initial_params()
        cycle = -(-params.size // CASES[name][1])
        probes = probes_at(params, CASES[name][1], np.linspace(0, cycle - 1, 3).astype(int))
        return step_ms(art, params, probes, probes, 64, x, y, "resnet20 auto")
    from common import deployed_artifact
    model, size, selection, batch = DEPLOYED[name]
    art = load_artifact(deployed_artifact(model, selection, **size), device="cpu", threads=2, engine="auto")
    shape = art.manifest["inputs"][0]["shape"][1:]
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((batch, *shape)).astype(np.float32), rng.integers(0, 10, batch)
    params = art.initial_params()
    cycle = -(-params.size // 16)
    probes = probes_at(params, 16, np.linspace(0, cycle - 1, min(24, cycle)).astype(int))
    return step_ms(art, params, probes, probes, None, x, y, f"{name} auto")


def engine_only(models):
    """auto ms per step for each model (for --baseline): one JSON line, last."""
    import json
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):
        result = {name: engine_ms(name) for name in models}
    print(json.dumps(result))


def paper_batch(name):
    """The timed batch of a paper model: uniform [0, 1) inputs, random labels or standard-normal targets."""
    _, _, batch, shape, classes, _ = CASES[name]
    rng = np.random.default_rng(0)
    x = rng.random((batch, *shape), dtype=np.float32)
    y = rng.integers(0, classes, batch) if classes else rng.standard_normal((batch, 7)).astype(np.float32)
    return x, y


def probes_at(params, budget, step_list):
    """CoCD's probes at the given steps of the coordinate cycle (lr 0, eps 1e-2)."""
    from edgezo.runtime.optim import CoCD
    opt, out = CoCD(params, lr=0.0, eps=1e-2, budget=budget), []
    for step in step_list:
        opt.refreshed = int(step) * budget
        out.append(opt.ask())
        opt.discard()
    return out


def cycle_ms(name):
    """The engine's (auto) ms per step of a paper model over one full coordinate cycle."""
    from edgezo.runtime import load_artifact
    model, budget = CASES[name][:2]
    art = load_artifact(builtin_artifact(model), device="cpu", threads=2, engine="auto")
    x, y = paper_batch(name)
    params = art.initial_params()
    probes = probes_at(params, budget, range(-(-params.size // budget)))
    art.losses(params, sample_rows(probes[0], 8), x, y)
    return 1000 * timed(lambda: [art.losses(params, p, x, y) for p in probes]) / len(probes)


def previous_results():
    import json
    path = RESULTS / "step_speed.json"
    return json.loads(path.read_text()) if path.exists() else {}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(CASES) + list(DEPLOYED), default=list(CASES))
    parser.add_argument("--steps", type=int, default=12, help="steps spread across the coordinate cycle")
    parser.add_argument("--sample", type=int, default=128, help="probe rows timed per step on the slow paths")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="deployed models: where the artifacts run (cuda: the device engine, onnxruntime-gpu)")
    parser.add_argument("--device-engine", action="store_true",
                        help="deployed models: also time the device engine (what --device cuda runs) on the CPU provider")
    parser.add_argument("--baseline", metavar="COMMIT",
                        help="compare the engine (auto) of this tree with COMMIT's code on --models, in interleaved "
                             "runs (each in its own process); no other timing")
    parser.add_argument("--rounds", type=int, default=3, help="--baseline: runs of each side")
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_only:
        return engine_only(args.models)
    if args.baseline:
        print(f"engine (auto) ms per step: {args.baseline} vs this tree, {args.rounds} interleaved rounds", flush=True)
        compared = interleaved(args.baseline, args.models, args.rounds)
        print(f"\n{'model':<18} {'baseline':>9} {'this tree':>10} {'ratio':>6} {'spread':>7}  within 10% or spread")
        for m, r in compared.items():
            print(f"{m:<18} {r['baseline_median_ms']:9.2f} {r['this_tree_median_ms']:10.2f} {r['ratio']:6.2f} "
                  f"{100 * r['spread']:6.0f}%  {'yes' if r['within'] else 'NO'}")
        write_json("step_speed_baseline", {"baseline_commit": args.baseline, "rounds": args.rounds, **compared})
        return 0
    DEVICE[0], DEVICE_ENGINE[0] = args.device, args.device_engine
    results = {}
    for name in args.models:
        print(f"{name}:", flush=True)
        results[name] = bench_deployed(name, max(args.steps, 24), min(args.sample, 8)) if name in DEPLOYED else \
            bench(name, args.steps, args.sample)
    deployed = {k: v for k, v in results.items() if k in DEPLOYED}
    if deployed:
        print(f"\n{'model':<18} {'auto ms':>9} {'batched':>9} {'naive':>9} {'forward':>8} {'vs naive':>9} "
              f"{'forwards':>9}  target")
        for name, r in deployed.items():
            fmt = lambda v: f"{v:9.2f}" if v is not None else f"{'n/a':>9}"
            print(f"{name:<18} {fmt(r['auto_ms'])} {fmt(r['batched_ms'])} {fmt(r['naive_ms'])} {r['forward_ms']:8.2f} "
                  f"{r['speedup_vs_naive']:8.1f}x {r['auto_in_forwards']:9.2f}  {r['target']}: "
                  f"{'met' if r['target_met'] else 'MISSED'}")
    paper = {k: v for k, v in results.items() if k not in DEPLOYED}
    if paper:
        print(f"\n{'model':<9} {'auto ms':>9} {'batched':>9} {'naive':>9} {'torch ref':>10} {'vs ref':>8} {'vs naive':>9}")
    for name, r in paper.items():
        fmt = lambda v: f"{v:9.2f}" if v is not None else f"{'n/a':>9}"
        print(f"{name:<9} {fmt(r['auto_ms'])} {fmt(r['batched_ms'])} {fmt(r['naive_ms'])} "
              f"{r['torch_reference_ms']:10.2f} {r['speedup_vs_torch_reference']:7.1f}x {r['speedup_vs_naive']:8.1f}x")
    write_json("step_speed", {**previous_results(), **results})  # models run earlier keep their rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
