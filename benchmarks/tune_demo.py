"""`edgezo tune` on the deployed-model demo (edgezo demo's task: the digit classifier's new 10-way head on
Fashion-MNIST, 1,024 training images, batch 64, 20 epochs = 320 steps). CoCD's budget stays the demo's 66 (132
evaluations a step, as BCCD and MeZO get); lr, eps and gamma are tuned on a 20% hold-out of the 1,024 training
images (the test images are not seen), then the tuned settings and the demo's defaults each train 20 epochs on
all 1,024 with three seeds (data order) and are scored on the demo's 1,000 test images. The tune's first
trial is the demo's defaults (--try).

    python benchmarks/tune_demo.py [--trials 40] [--out runs/tune_demo]   -> benchmarks/results/tune_demo.json
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import train_flags  # noqa: E402
from edgezo.adapt_demo import BATCH, MODEL, ZO, make_data  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SEEDS = (0, 1, 2)


def edgezo(*args):
    subprocess.run([sys.executable, "-m", "edgezo.cli", *map(str, args)], check=True)


def accuracy(run):
    history = json.loads((run / "metrics.json").read_text())["history"]
    return history[-1]["val_accuracy"], json.loads((run / "metrics.json").read_text())["seconds"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--out", default="runs/tune_demo")
    args = p.parse_args()
    out = Path(args.out)
    from edgezo.exporters.onnx_import import export_onnx
    if not (out / "artifact").exists():
        make_data(out / "data")
        export_onnx(MODEL, out / "artifact", "cross_entropy", last_layers=1, num_classes=10, seed=0,
                    log=lambda line: None)
    train, test = out / "data" / "train.npz", out / "data" / "test.npz"
    defaults = ZO["CoCD"]
    fixed = ["--optimizer", "cocd", "--budget", "66", "--engine-memory-mb", "64"]
    if not (out / "tune" / "best.json").exists():
        edgezo("tune", out / "artifact", "--data", train, "--val-fraction", 0.2, *fixed, "--batch-size", BATCH,
               "--trials", args.trials, "--steps", 320, "--eval-every", 32, "--try", "lr=0.03,eps=0.05,gamma=0.95",
               "--out", out / "tune")
    best = json.loads((out / "tune" / "best.json").read_text())
    tuned = train_flags(best["settings"])
    common = ["--data", train, "--val-data", test, "--batch-size", BATCH, "--epochs", 20]
    result = {"best_trial": best, "demo_defaults": defaults, "seeds": SEEDS}
    for name, settings in (("defaults", defaults), ("tuned", fixed + tuned)):
        accs = []
        for seed in SEEDS:  # one run's accuracy swings by points from epoch to epoch: three seeds each
            run = out / f"{name}_seed{seed}"
            if not (run / "metrics.json").exists():
                edgezo("train", out / "artifact", *common, *settings, "--seed", seed, "--out", run)
            accs.append(accuracy(run)[0])
        result[name] = {"test_accuracy_per_seed": accs, "test_accuracy_mean": sum(accs) / len(accs)}
        print(f"{name}: {100 * sum(accs) / len(accs):.1f}% mean test accuracy after 20 epochs "
              f"(seeds {SEEDS}: {', '.join(f'{100 * a:.1f}%' for a in accs)})")
    tune = json.loads((out / "tune" / "tune.json").read_text())
    result["tune"] = {k: tune[k] for k in ("seconds", "trials_done", "trials_per_minute", "space")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tune_demo.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
