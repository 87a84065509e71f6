"""The paper's Fig. 3 on MNIST: CoCD at the ablation defaults (gamma 1.0, eps 1.0, B 256, M 1; lr 1e-2, batch 128,
paper-cnn, seed 0, 20 epochs) and one setting changed at a time, gathered from the mnist-ablations JSON files
benchmarks/paper.py wrote (one process may run the defaults and some settings, another the rest with
--skip-defaults). One panel per setting, the defaults' curve in each; a summary of final and best test accuracy.
Writes benchmarks/results/paper_mnist_ablations_paper-cnn.{json,png}.

Usage: python benchmarks/paper_ablations_mnist.py
"""
import json
import sys

from common import RESULTS, write_json
from paper_seeds import accuracy_curve, summarize

SETTINGS = ("eps", "gamma", "budget", "M")


def gather():
    """label -> run, over every paper_mnist-ablations*_paper-cnn.json (the newest file wins a repeated label)."""
    runs = {}
    for path in sorted(RESULTS.glob("paper_mnist-ablations*_paper-cnn.json"), key=lambda p: p.stat().st_mtime):
        for run in json.loads(path.read_text())["runs"]:
            if run["history"]:
                runs[run["label"]] = dict(run, file=path.name)
    return runs


def main():
    runs = gather()
    if not runs:
        print("no mnist-ablations results yet: python benchmarks/paper.py --tasks mnist-ablations --epochs 20")
        return 1
    summary = {label: dict(summarize(run, label), file=run["file"]) for label, run in runs.items()}
    write_json("paper_mnist_ablations_paper-cnn", summary)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(16, 4), sharey=True)
    defaults = next((run for label, run in runs.items() if label.startswith("defaults")), None)
    for ax, key in zip(axes, SETTINGS):
        for label, run in runs.items():
            if label.startswith(key + "=") or run is defaults:
                acc = accuracy_curve(run)
                ax.plot(range(1, len(acc) + 1), acc, label=label, ls="--" if run is defaults else "-")
        ax.set_title(f"MNIST CoCD, {key}")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(RESULTS / "paper_mnist_ablations_paper-cnn.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
