"""Does `edgezo tune` find settings that train? The paper's MNIST CNN (paper-cnn), CoCD at Table 1's B 256,
batch 128, weight decay 1e-4: a tune of lr, eps and gamma in short trials on 90% of the training set (10% held
out), then the best trial's settings and the paper's (lr 1e-2, eps 0.1, gamma 0.99) each train 15 epochs on
the whole training set, scored on the test set. The tune's first trial is the paper's settings (--try), so
the short trials' verdict on them is in the report. Each stage is skipped when its output exists, so it can be
run in parts:

    python benchmarks/tune_mnist.py --stage tune   [--minutes 60]
    python benchmarks/tune_mnist.py --stage best   (the tuned settings, 15 epochs)
    python benchmarks/tune_mnist.py --stage paper  (the paper's settings, 15 epochs)
    python benchmarks/tune_mnist.py --stage report (benchmarks/results/tune_mnist.json)
"""
import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from common import train_flags

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / ".." / "shared" / "datasets" / "mnist"
RESULTS = ROOT / "benchmarks" / "results"
FIXED = ["--optimizer", "cocd", "--budget", "256", "--weight-decay", "0.0001", "--batch-size", "128"]
PAPER = ["--lr", "0.01", "--eps", "0.1", "--gamma", "0.99"]
PAPER_TRY = {"lr": 0.01, "eps": 0.1, "gamma": 0.99}  # the tune tries the paper's settings first (--try)


def edgezo(*args):
    print("$ edgezo " + shlex.join(map(str, args)), flush=True)
    subprocess.run([sys.executable, "-m", "edgezo.cli", *map(str, args)], check=True)


def full_run(work, name, settings, threads):
    out = work / name
    if not (out / "metrics.json").exists():
        edgezo("train", work / "paper-cnn", "--data", MNIST / "train-images-idx3-ubyte.gz", "--val-data",
               MNIST / "t10k-images-idx3-ubyte.gz", *FIXED, *settings, "--epochs", 15, "--threads", threads,
               "--out", out)
    return json.loads((out / "metrics.json").read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("tune", "best", "paper", "report"), required=True)
    p.add_argument("--work", default="runs/tune_mnist", help="artifact, tune and run folders")
    p.add_argument("--minutes", type=float, default=60)
    p.add_argument("--trials", type=int, default=200, help="an upper bound; --minutes ends the tune")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="for the 15-epoch runs")
    args = p.parse_args()
    work = Path(args.work)
    if not (work / "paper-cnn").exists():
        edgezo("export", "--model", "paper-cnn", "--out", work / "paper-cnn")
    if args.stage == "tune" and not (work / "tune" / "best.json").exists():
        edgezo("tune", work / "paper-cnn", "--data", MNIST / "train-images-idx3-ubyte.gz", "--val-fraction", 0.1,
               *FIXED, "--trials", args.trials, "--steps", args.steps, "--eval-every", 100, "--grace-steps", 200,
               "--concurrent", args.concurrent, "--time-budget-min", args.minutes,
               "--try", ",".join(a.lstrip("-") + "=" + b for a, b in zip(PAPER[::2], PAPER[1::2])),
               "--out", work / "tune")
    best = json.loads((work / "tune" / "best.json").read_text()) if (work / "tune" / "best.json").exists() else None
    tuned = train_flags(best["settings"]) if best else None
    if args.stage == "best":
        full_run(work, "best15", tuned, args.threads)
    if args.stage == "paper":
        full_run(work, "paper15", PAPER, args.threads)
    if args.stage == "report":
        summary = json.loads((work / "tune" / "tune.json").read_text())
        runs = {name: json.loads((work / name / "metrics.json").read_text())["history"]
                for name in ("best15", "paper15")}
        result = {"tune": {k: summary[k] for k in ("seconds", "trials_done", "trials_ok", "trials_per_minute",
                                                    "steps", "concurrent", "threads_per_trial", "space")},
                  "best": best, "paper_settings": PAPER,
                  "paper_settings_trial": next((t for t in summary["trials"] if t["settings"] == PAPER_TRY), None),
                  "rank_of_paper_settings": 1 + sorted(t["val_loss"] for t in summary["trials"]
                                                       if t["val_loss"] is not None).index(
                      next(t["val_loss"] for t in summary["trials"] if t["settings"] == PAPER_TRY)),
                  "statuses": {s: sum(t["status"] == s for t in summary["trials"])
                               for s in ("finished", "stopped early", "diverged", "error")},
                  "test_accuracy_by_epoch": {k: [round(100 * r["val_accuracy"], 2) for r in v]
                                             for k, v in runs.items()}}
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "tune_mnist.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result["test_accuracy_by_epoch"]))


if __name__ == "__main__":
    main()
