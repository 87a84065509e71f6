"""The figure paper.py writes beside each task's JSON: accuracy or validation MSE per epoch, or ResNet-20's
loss and accuracy per step."""


def plot(task, runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if task == "resnet20":
        curve = runs[0]["curve"]
        ax.plot([p["step"] for p in curve], [p["train_loss"] for p in curve], label="train loss (batch)")
        tested = [p for p in curve if "test_accuracy" in p]
        ax.plot([p["step"] for p in tested], [p["test_accuracy"] for p in tested], "o-", label="test accuracy (1,000)")
        ax.set_xlabel("step")
        ax.set_title("paper benchmark: ResNet-20 CoCD B=2048, Fashion-MNIST 32x32")
    else:
        first = next(r["history"][0] for r in runs if r["history"])
        key = "val_accuracy" if "val_accuracy" in first else "val_loss"
        for r in runs:
            ax.plot([h["epoch"] for h in r["history"]], [h[key] for h in r["history"]], label=r["label"])
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy" if key == "val_accuracy" else "validation MSE (standardized)")
        if key == "val_loss":
            ax.set_yscale("log")
        ax.set_title(f"paper benchmark: {task}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
