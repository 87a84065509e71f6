"""Peak memory: CoCD forward-only (edgezo, onnxruntime) vs torch Adam with backprop, side by side.

SARCOS MLP, MNIST CNN and ResNet-20 at batch 128, each method in a fresh process (edgezo.profile_worker),
a few steps each. Reported: peak RSS rise over the post-import baseline and the ratio CoCD / Adam
(target for ResNet-20: <= 1/3). CoCD runs with the engine's chunk cap given by --engine-memory-mb
and with --lean-memory (the memory-lean setting; the engine trades memory for speed above it). B is
small for ResNet-20: the engine's chunks, not B, set the memory. Writes benchmarks/results/memory.json and memory.png.

Usage: python benchmarks/memory.py [--models mlp cnn resnet20] [--engine-memory-mb 32]
"""
import argparse
import json
import subprocess
import sys

from common import RESULTS, builtin_artifact, write_json

CASES = {"mlp": ("sarcos-mlp", 64, 5), "cnn": ("mnist-cnn", 64, 3), "resnet20": ("resnet20", 4, 2)}


def worker(method, artifact, budget, steps, engine_mb, batch):
    config = {"method": method, "artifact": str(artifact), "batch_size": batch, "steps": steps, "device": "cpu",
              "budget": budget, "memory_fraction": 1.0, "engine_memory_mb": engine_mb, "threads": 2,
              "lean_memory": method == "cocd"}
    out = subprocess.run([sys.executable, "-m", "edgezo.profile_worker", json.dumps(config)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    names = list(results)
    xs = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6, 4))
    for offset, method in ((-0.2, "cocd"), (0.2, "adam")):
        ax.bar(xs + offset, [results[n][method]["rise_mb"] for n in names], 0.4,
               label="edgezo CoCD (forward only)" if method == "cocd" else "torch Adam (backprop)")
    ax.set_xticks(xs, names)
    ax.set_ylabel("peak RSS rise over post-import baseline (MiB)")
    ax.set_title("Training memory at batch 128")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--engine-memory-mb", type=float, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    results = {}
    for name in args.models:
        model, budget, steps = CASES[name]
        artifact = builtin_artifact(model)
        print(f"{name}: profiling CoCD and Adam ...", flush=True)
        cocd = worker("cocd", artifact, budget, steps, args.engine_memory_mb, args.batch_size)
        adam = worker("adam", artifact, budget, steps, args.engine_memory_mb, args.batch_size)
        results[name] = {"cocd": cocd, "adam": adam, "ratio": cocd["rise_mb"] / adam["rise_mb"]}
        print(f"  CoCD rise {cocd['rise_mb']:.1f} MiB (peak {cocd['peak_rss_mb']:.1f}), Adam rise "
              f"{adam['rise_mb']:.1f} MiB (peak {adam['peak_rss_mb']:.1f}): ratio {results[name]['ratio']:.2f}",
              flush=True)
    print(f"\n{'model':<9} {'CoCD rise':>10} {'Adam rise':>10} {'ratio':>7}")
    for name, r in results.items():
        print(f"{name:<9} {r['cocd']['rise_mb']:10.1f} {r['adam']['rise_mb']:10.1f} {r['ratio']:7.2f}")
    if "resnet20" in results:
        ok = results["resnet20"]["ratio"] <= 1 / 3
        print(f"ResNet-20 target (CoCD <= 1/3 of Adam): {'met' if ok else 'missed'}")
    write_json("memory", {"batch_size": args.batch_size, "engine_memory_mb": args.engine_memory_mb, **results})
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, RESULTS / "memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
