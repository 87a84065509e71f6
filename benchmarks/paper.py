"""The paper's benchmarks (CoCD, ICML 2026, Table 1 settings) from one script.

Tasks:
  sarcos     MLP 21-64-64-64-32-7 on SARCOS (the 4,449-row split in ../shared, split by seed 80/20 into
             train and validation; --sarcos for the full sarcos_inv.mat), batch 64: CoCD (lr 1e-3,
             gamma 1.0, eps 1.0, B 64), BCCD (eps 1e-6), torch SGD momentum 0.9 (lr 1e-2).
  mnist      CNN (21,578 params) on MNIST, batch 128: CoCD (lr 1e-2, gamma 0.99, eps 0.1, B 256), BCCD (eps
             1e-6), torch SGD momentum 0.9 (lr 1e-2). Test accuracy on the 10,000 test digits.
  fashion    the same on Fashion-MNIST.
  ablations  SARCOS CoCD over eps, gamma, B and M = m/n in {1, 0.5, 0.25}; with --ablate M-lr also M in
             {0.5, 0.25} at lr / M (with m < n a coordinate moves only in M of the steps).
  mnist-gamma  MNIST CoCD at the paper's settings but gamma 0.9 and 0.95 (--gammas; the paper's CNN momentum
             ablation; gamma is the stability valve the authors' README recommends lowering).
  baselines  SARCOS at a matched budget of 64 evaluations per step: CoCD (B 32, central), SPSA (32
             directions), ZO-SGD (63 directions + base), MeZO-SGD (32 directions) (the paper's Fig. 4).
All runs: weight decay 1e-4. SARCOS inputs and torques are standardized with the training split's
statistics (validation loss is MSE of standardized torques). Writes benchmarks/results/paper_<task>.json
and paper_<task>.png.

The paper's SARCOS runs use the full training split (44,484 rows: 696 steps per epoch); the 4,449-row
split in ../shared gives 56. --match-paper-steps runs the SARCOS tasks for as many epochs as the paper's
step count needs (50 paper epochs = 34,800 steps = 622 epochs of the small split).

Usage: python benchmarks/paper.py --tasks sarcos ablations baselines [--epochs 50]
       python benchmarks/paper.py --tasks sarcos ablations baselines --match-paper-steps
       python benchmarks/paper.py --tasks mnist --epochs 50     (about 30 s per CoCD epoch on 2 cores)
"""
import argparse
import sys
import time


from common import RESULTS, SHARED, builtin_artifact, write_json
from edgezo.runtime import data as data_mod
from edgezo.runtime import load_artifact
from edgezo.runtime.optim import BCCD, SPSA, ZOSGD, CoCD, MeZOSGD
from edgezo.runtime.train import fit

WD = 1e-4
PAPER_SARCOS_TRAIN_ROWS = 44_484
OPTIMIZERS = ["cocd", "bccd", "sgd"]  # Table 1's rows, in its order
ABLATIONS = {"eps": (0.1, 1.0, 3.0), "gamma": (0.0, 0.9, 0.99, 1.0), "budget": (16, 64, 256), "M": (1.0, 0.5, 0.25),
             "M-lr": (0.5, 0.25)}
ABLATE_DEFAULT = ["eps", "gamma", "budget", "M"]
CURRENT = {"task": None, "name": None, "epochs": None, "runs": []}  # written after every run, so a long task keeps its results


def finished(result):
    CURRENT["runs"].append(result)
    write_json(CURRENT["name"], CURRENT)
    return result


def sarcos_epochs(args, train, batch=64):
    """--epochs, or with --match-paper-steps the epochs of this split that make the paper's step count."""
    if not args.match_paper_steps:
        return args.epochs
    paper_steps = args.epochs * data_mod.batches_per_epoch(PAPER_SARCOS_TRAIN_ROWS, batch)
    per_epoch = data_mod.batches_per_epoch(data_mod.num_rows(train), batch)
    epochs = -(-paper_steps // per_epoch)
    print(f"  --match-paper-steps: {epochs} epochs of {per_epoch} steps ~ {paper_steps} paper steps", flush=True)
    return epochs


def sarcos_data(path, seed=0):
    x, y = data_mod.load_sarcos(path)
    train, val = data_mod.split({"x": x, "y": y}, 0.2, seed)
    for key in ("x", "y"):
        mean, std = train[key].mean(0), train[key].std(0) + 1e-8
        train[key], val[key] = (train[key] - mean) / std, (val[key] - mean) / std
    return train, val


def mnist_data(folder, standardize=False):
    """Pixels in [0, 1]; with standardize, minus the training set's mean pixel over its std (torchvision's
    Normalize((0.1307,), (0.3081,)) for MNIST)."""
    x, y = data_mod.load_idx_pair(folder / "train-images-idx3-ubyte.gz")
    xt, yt = data_mod.load_idx_pair(folder / "t10k-images-idx3-ubyte.gz")
    if standardize:
        mean, std = float(x.mean()), float(x.std())
        x, xt = (x - mean) / std, (xt - mean) / std
    return {"x": x, "y": y}, {"x": xt, "y": yt}


def run(label, artifact, make_optimizer, train, val, batch, epochs, seed=0):
    params = artifact.initial_params()
    opt = make_optimizer(params)
    start = time.perf_counter()
    history = fit(artifact, opt, train, batch, epochs, seed=seed, val_data=val,
                  log=lambda line: print(f"  {label}: {line}", flush=True))
    return finished({"label": label, "history": history, "seconds": time.perf_counter() - start,
                     "steps": opt.steps})


def run_sgd(label, model, train, val, batch, epochs, lr=1e-2):
    from edgezo.reference import fit_torch
    start = time.perf_counter()
    history, _ = fit_torch(builtin_artifact(model), "momentum", train, batch, epochs, lr, val_data=val,
                           weight_decay=WD, log=lambda line: print(f"  {label}: {line}", flush=True))
    return finished({"label": label, "history": history, "seconds": time.perf_counter() - start,
                     "steps": history[-1]["steps"]})


def compare(args, art, model, train, val, batch, epochs, lr, cocd):
    """Table 1's three rows for one task (those in --optimizers): CoCD (its paper settings, gamma from --gamma
    where given), BCCD (eps 1e-6), SGD momentum 0.9."""
    budget, label = cocd["budget"], "CoCD"
    if args.gamma is not None:
        cocd, label = dict(cocd, gamma=args.gamma), f"CoCD gamma={args.gamma}"
    rows = {"cocd": lambda: run(label, art, lambda p: CoCD(p, lr=lr, weight_decay=WD, **cocd), train, val, batch,
                                epochs),
            "bccd": lambda: run("BCCD", art, lambda p: BCCD(p, lr=lr, eps=1e-6, budget=budget, weight_decay=WD),
                                train, val, batch, epochs),
            "sgd": lambda: run_sgd("SGD momentum 0.9", model, train, val, batch, epochs)}
    return [rows[name]() for name in args.optimizers]


def cpu_artifact(args, model):
    return load_artifact(builtin_artifact(model), device="cpu", threads=args.threads)


def task_sarcos(args):
    train, val = sarcos_data(args.sarcos)
    return compare(args, cpu_artifact(args, "sarcos-mlp"), "sarcos-mlp", train, val, 64, sarcos_epochs(args, train),
                   1e-3, dict(eps=1.0, budget=64, gamma=1.0))


def task_mnist(args, folder="mnist"):
    train, test = mnist_data(SHARED / "datasets" / folder, args.standardize)
    return compare(args, cpu_artifact(args, "mnist-cnn"), "mnist-cnn", train, test, 128, args.epochs, 1e-2,
                   dict(eps=0.1, budget=256, gamma=0.99))


def task_mnist_gamma(args):
    train, test = mnist_data(SHARED / "datasets" / "mnist", args.standardize)
    art = cpu_artifact(args, "mnist-cnn")
    return [run(f"CoCD gamma={gamma}", art, lambda p, g=gamma: CoCD(p, lr=1e-2, eps=0.1, budget=256, gamma=g,
                                                                  weight_decay=WD), train, test, 128, args.epochs)
            for gamma in args.gammas]


def task_ablations(args):
    train, val = sarcos_data(args.sarcos)
    art = cpu_artifact(args, "sarcos-mlp")
    base = dict(lr=1e-3, eps=1.0, budget=64, gamma=1.0, weight_decay=WD)
    n, epochs = art.num_params, sarcos_epochs(args, train)
    variants = [(key, v) for key in args.ablate for v in ABLATIONS[key]]
    runs = []
    for key, value in variants:
        settings = dict(base)
        if key.startswith("M"):
            settings["memory"] = max(1, int(round(value * n)))
            if key == "M-lr":  # a coordinate moves only while in the m-slot window: lr / M restores its travel per cycle
                settings["lr"] = base["lr"] / value
        else:
            settings[key] = value
        runs.append(run(f"{key}={value}", art, lambda p, s=settings: CoCD(p, **s), train, val, 64, epochs))
    return runs


def task_baselines(args):
    train, val = sarcos_data(args.sarcos)
    art = cpu_artifact(args, "sarcos-mlp")
    epochs = sarcos_epochs(args, train)
    return [run("CoCD B=32 (64 evals)", art, lambda p: CoCD(p, lr=1e-3, eps=1.0, budget=32, weight_decay=WD),
                train, val, 64, epochs),
            run("SPSA q=32 (64 evals)", art, lambda p: SPSA(p, lr=1e-4, mu=1e-2, directions=32), train, val, 64,
                epochs),
            run("ZO-SGD q=63 (64 evals)", art, lambda p: ZOSGD(p, lr=1e-4, mu=1e-2, directions=63), train, val, 64,
                epochs),
            run("MeZO-SGD q=32 (64 evals)", art, lambda p: MeZOSGD(p, lr=1e-4, mu=1e-2, directions=32), train, val,
                64, epochs)]


TASKS = {"sarcos": task_sarcos, "mnist": task_mnist, "fashion": lambda a: task_mnist(a, "fashion-mnist"),
         "ablations": task_ablations, "mnist-gamma": task_mnist_gamma, "baselines": task_baselines}


def result_name(args, task, matched):
    """paper_<task>, plus what differs from the default run: _paper_steps, _<optimizers>, _gamma<g>, _<ablate>,
    _std."""
    name = f"paper_{task}" + ("_paper_steps" if matched else "")
    if task in ("sarcos", "mnist", "fashion"):
        if args.optimizers != OPTIMIZERS:
            name += "_" + "_".join(args.optimizers)
        if args.gamma is not None:
            name += f"_gamma{args.gamma:g}"
    if task == "ablations" and args.ablate != ABLATE_DEFAULT:
        name += "_" + "_".join(args.ablate)
    if args.standardize and task in ("mnist", "fashion", "mnist-gamma"):
        name += "_std"
    return name


def plot(task, runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = "val_accuracy" if "val_accuracy" in runs[0]["history"][0] else "val_loss"
    fig, ax = plt.subplots(figsize=(7, 4.5))
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["sarcos", "ablations", "baselines"])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--ablate", nargs="+", choices=list(ABLATIONS),
                        default=ABLATE_DEFAULT,
                        help="ablations: which settings to vary (M-lr: M in {0.5, 0.25} with lr scaled by 1/M)")
    parser.add_argument("--gammas", nargs="+", type=float, default=[0.9, 0.95], help="mnist-gamma: the gammas to run")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=OPTIMIZERS,
                        help="sarcos, mnist, fashion: which of Table 1's rows to run")
    parser.add_argument("--gamma", type=float, default=None,
                        help="sarcos, mnist, fashion: CoCD's gamma instead of the paper's (1.0 SARCOS, 0.99 CNN)")
    parser.add_argument("--standardize", action="store_true",
                        help="mnist, fashion: standardize pixels by the training set's mean and std (default [0, 1])")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime and engine threads per run")
    parser.add_argument("--out", default=None, help="results file stem under benchmarks/results (default "
                        "paper_<task>, plus _paper_steps, _<optimizers>, _gamma<g>, _<ablate>, _std where they are given)")
    parser.add_argument("--match-paper-steps", action="store_true",
                        help="SARCOS tasks: run the paper's number of optimizer steps (more epochs of a small split)")
    parser.add_argument("--sarcos", default=str(SHARED / "datasets" / "sarcos" / "sarcos_inv_test.mat"),
                        help="SARCOS .mat (the full sarcos_inv.mat when you have it)")
    args = parser.parse_args()
    for task in args.tasks:
        print(f"== {task} ({args.epochs} epochs)", flush=True)
        matched = args.match_paper_steps and task in ("sarcos", "ablations", "baselines")
        name = args.out or result_name(args, task, matched)
        CURRENT.update(task=task, name=name, epochs=args.epochs, match_paper_steps=matched, runs=[])
        runs = TASKS[task](args)
        final = []
        for r in runs:
            last = r["history"][-1]
            metric = f"acc {100 * last['val_accuracy']:.2f}%" if "val_accuracy" in last else \
                f"val MSE {last['val_loss']:.4f}"
            final.append(f"  {r['label']:<28} {metric}  ({r['seconds']:.0f} s, {r['steps']} steps)")
        print("\n".join(final), flush=True)
        plot(task, runs, RESULTS / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
