"""MNIST at Table 1's settings over seeds (paper-cnn, CoCD gamma 0.99, seeds 0-2), with BCCD and Fashion-MNIST
beside, and the dead-ReLU test (paper-cnn-leaky, LeakyReLU 0.01, seeds 0 and 1, against the same seeds with
ReLU): a two-panel figure and a summary (final and best test accuracy per run, mean and spread of the seeds'
finals), from the per-run JSON files benchmarks/paper.py wrote. Writes benchmarks/results/paper_seeds_paper-cnn.{json,png}.

Usage: python benchmarks/paper_seeds.py
"""
import json
import statistics
import sys

from common import RESULTS, write_json

RUNS = [("MNIST CoCD seed 0", "paper_mnist_cocd_paper-cnn"), ("MNIST CoCD seed 1", "paper_mnist_cocd_paper-cnn_seed1"),
        ("MNIST CoCD seed 2", "paper_mnist_cocd_paper-cnn_seed2"), ("MNIST BCCD seed 0", "paper_mnist_bccd_paper-cnn"),
        ("Fashion-MNIST CoCD seed 0", "paper_fashion_cocd_paper-cnn"),
        ("MNIST CoCD seed 1, no stop rule", "paper_mnist_cocd_paper-cnn_seed1_nostop"),
        ("Fashion-MNIST CoCD seed 0, no stop rule", "paper_fashion_cocd_paper-cnn_nostop")]
LEAKY = "paper_mnist_cocd_paper-cnn-leaky_seed0-1_15ep"  # both seeds in one file: (label, file, index of the run)
LEAKY_RUNS = [("MNIST leaky CoCD seed 0", LEAKY, 0), ("MNIST leaky CoCD seed 1", LEAKY, 1)]
RELU_VS_LEAKY = ["MNIST CoCD seed 0", "MNIST CoCD seed 1, no stop rule", *(label for label, _, _ in LEAKY_RUNS)]


def accuracy_curve(run):
    """Test accuracy (%) per epoch of one paper.py run."""
    return [100 * h["val_accuracy"] for h in run["history"]]


def summarize(run, label):
    """Final and best test accuracy (%) of one paper.py run, printed as one line."""
    acc = accuracy_curve(run)
    out = {"epochs": len(acc), "final": acc[-1], "best": max(acc), "best_epoch": acc.index(max(acc)) + 1,
           "stopped": run.get("stopped"), "still_running": bool(run.get("running"))}
    print(f"{label:<28} {len(acc):3d} epochs  final {acc[-1]:6.2f}%  best {max(acc):6.2f}% (epoch {out['best_epoch']})"
          + ("  stopped: " + run["stopped"]["reason"] if run.get("stopped") else "")
          + ("  (still running)" if run.get("running") else ""))
    return out


def main():
    summary, curves = {}, {}
    for label, name, index in [(label, name, 0) for label, name in RUNS] + LEAKY_RUNS:
        path = RESULTS / f"{name}.json"
        runs = json.loads(path.read_text())["runs"] if path.exists() else []
        if len(runs) <= index:
            print(f"{label}: not in {path.name} yet")
            continue
        run = runs[index]
        curves[label] = accuracy_curve(run)
        summary[label] = dict(summarize(run, label), file=path.name)
    seeds = {k: v for k, v in summary.items() if k.startswith("MNIST CoCD seed") and "no stop" not in k}
    if "MNIST CoCD seed 1, no stop rule" in summary:  # the longer run of the same seed (same first epochs)
        seeds["MNIST CoCD seed 1"] = summary["MNIST CoCD seed 1, no stop rule"]
    finals = [v["final"] for v in seeds.values()]
    if finals:
        summary["MNIST CoCD seeds"] = {"finals": finals, "mean": statistics.mean(finals),
                                       "spread_std": statistics.pstdev(finals), "paper": 95.48}
        print(f"MNIST CoCD over {len(finals)} seeds: final {statistics.mean(finals):.2f}% mean, "
              f"{statistics.pstdev(finals):.2f} std (the paper: 95.48%)")
    write_json("paper_seeds_paper-cnn", summary)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (seeds_ax, leaky_ax) = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, labels, title in [(seeds_ax, [k for k in curves if "leaky" not in k], "paper-cnn, Table 1 settings (CoCD "
                               "gamma 0.99, eps 0.1, B 256, lr 1e-2)"),
                              (leaky_ax, [k for k in RELU_VS_LEAKY if k in curves], "the same: ReLU (solid) vs "
                               "LeakyReLU 0.01 (dashed)")]:
        for label in labels:
            acc = curves[label]
            color = ("C0" if "seed 0" in label else "C1") if ax is leaky_ax else None  # one colour per seed
            ax.plot(range(1, len(acc) + 1), acc, "--" if "leaky" in label else "-", color=color, label=label)
        ax.axhline(95.48, ls=":", c="gray", lw=0.8, label="paper: MNIST CoCD 95.48%")
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    seeds_ax.set_ylabel("test accuracy (%)")
    leaky_epochs = [len(curves[label]) for label, _, _ in LEAKY_RUNS if label in curves]
    if leaky_epochs:  # the ReLU seed 1 run goes on to 50 at chance; the comparison is over the leaky runs' epochs
        leaky_ax.set_xlim(0, max(leaky_epochs) + 5)
    fig.tight_layout()
    fig.savefig(RESULTS / "paper_seeds_paper-cnn.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
