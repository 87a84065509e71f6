"""`edgezo profile`: peak memory of forward-only training against SGD / momentum / Adam with backprop.

Every method runs in a fresh subprocess (edgezo.profile_worker) on the same artifact, batch and
steps. Output: a terminal table, profile.json and profile.png (measured bars beside an analytic
breakdown: weights, gradients, optimizer state, activations, gradient buffer, engine chunk).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from .runtime.errors import check

MIB = 2 ** 20


def methods(quarter=True):
    """(label, worker method, memory fraction)."""
    rows = [("inference", "inference", None), ("edgezo CoCD m=n", "cocd", 1.0)]
    if quarter:
        rows.append(("edgezo CoCD m=n/4", "cocd", 0.25))
    rows += [("torch CoCD (reference)", "torch-cocd", None), ("torch SGD", "sgd", None),
             ("torch SGD momentum", "momentum", None), ("torch Adam", "adam", None)]
    return rows


def breakdown(manifest, artifact_dir, batch, budget, engine_mb):
    """Analytic MiB per component for each worker method and memory fraction."""
    from .devices.plan import activations_mb, engine_need_mb
    n = manifest["num_params"]
    acts_all, acts_pair, width = (MIB * v for v in activations_mb(artifact_dir, manifest, batch))
    weights = 4 * n
    engine = MIB * min(engine_mb, engine_need_mb(width / MIB, batch, budget))
    out = {}
    for label, method, fraction in methods():
        parts = {"weights": weights}
        if method in ("sgd", "momentum", "adam"):
            parts.update(gradients=weights, activations=acts_all)
            parts["optimizer state"] = {"sgd": 0, "momentum": weights, "adam": 2 * weights}[method]
        elif method == "cocd":
            parts.update(activations=acts_pair, **{"gradient buffer m": 4 * max(1, round(fraction * n)),
                                                   "engine chunk": engine})
        else:
            parts["activations"] = acts_pair
        out[label] = {k: v / MIB for k, v in parts.items()}
    return out


def run_worker(config, timeout):
    proc = subprocess.run([sys.executable, "-m", "edgezo.profile_worker", json.dumps(config)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": config["method"], "error": last[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(results, analytic, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(results)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = np.arange(len(labels))
    measured = [results[k].get("rise_mb") or 0 for k in labels]
    ax.bar(xs - 0.2, measured, 0.4, label="measured peak RSS rise", color="black")
    bottom = np.zeros(len(labels))
    components = sorted({c for v in analytic.values() for c in v})
    for c in components:
        values = np.array([analytic[k].get(c, 0) for k in labels])
        ax.bar(xs + 0.2, values, 0.4, bottom=bottom, label=f"analytic: {c}")
        bottom += values
    ax.set_xticks(xs, labels, rotation=20, ha="right")
    ax.set_ylabel("MiB")
    ax.set_title("Peak memory of training: measured rise over the post-import baseline vs analytic parts")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile(artifact_dir, out_dir, batch_size=128, steps=20, device="cpu", budget=64, engine_memory_mb=256,
            timeout=1800, log=print):
    from .runtime.manifest import read
    from .runtime.files import check_new_folder, save_json
    check(batch_size >= 1 and steps >= 1 and budget >= 1,
          f"--batch-size, --steps and --budget must be >= 1, got {batch_size}, {steps}, {budget}")
    check(device in ("cpu", "cuda"), f"--device must be cpu or cuda, got {device!r}")
    out_dir = check_new_folder(out_dir)
    manifest = read(Path(artifact_dir) / "manifest.json")
    if "reference" not in manifest["files"]:
        log("first-order baselines: loss.onnx through the ONNX-to-torch interpreter (imported model, no reference.pt2)")
    analytic = breakdown(manifest, artifact_dir, batch_size, budget, engine_memory_mb)
    results = {}
    for label, method, fraction in methods():
        config = {"method": method, "artifact": str(Path(artifact_dir).resolve()), "batch_size": batch_size,
                  "steps": steps, "device": device, "budget": budget, "memory_fraction": fraction or 1.0,
                  "engine_memory_mb": engine_memory_mb, "threads": 2}
        log(f"profiling {label} ...")
        results[label] = run_worker(config, timeout)
    rows = format_table(results, analytic)
    log("\n".join(rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"artifact": str(Path(artifact_dir).resolve()), "num_params": manifest["num_params"],
              "batch_size": batch_size, "steps": steps, "device": device, "budget": budget,
              "engine_memory_mb": engine_memory_mb, "measured": results, "analytic_mb": analytic}
    save_json(out_dir / "profile.json", report)
    plot(results, analytic, out_dir / "profile.png")
    log(f"wrote {out_dir / 'profile.json'} and {out_dir / 'profile.png'}")
    return report


def format_table(results, analytic):
    rows = [f"{'method':<24} {'baseline':>9} {'peak RSS':>9} {'rise':>8} {'analytic':>9} {'s/step':>8}  torch"]
    for label, r in results.items():
        if "error" in r:
            rows.append(f"{label:<24} unavailable: {r['error']}")
            continue
        rows.append(f"{label:<24} {r['baseline_mb']:9.1f} {r['peak_rss_mb']:9.1f} {r['rise_mb']:8.1f} "
                    f"{sum(analytic[label].values()):9.1f} {r['seconds_per_step']:8.4f}  {r['torch_imported']}")
    return rows
