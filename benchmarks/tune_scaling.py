"""How `edgezo tune` scales on this CPU: the same 6 trials (paper-cnn on MNIST, CoCD B 256, batch 128, 150 steps,
no early stopping, seed 0) with --concurrent 1 (all cores to one trial's onnxruntime) and --concurrent 2 (one
thread each). Prints trials per minute side by side and their ratio; writes benchmarks/results/tune_scaling.json.

    python benchmarks/tune_scaling.py [--trials 6] [--steps 150]
Run it alone: other work on a 2-core machine distorts timings.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / ".." / "shared" / "datasets" / "mnist" / "train-images-idx3-ubyte.gz"


def tune(artifact, out, concurrent, trials, steps):
    subprocess.run([sys.executable, "-m", "edgezo.cli", "tune", artifact, "--data", MNIST, "--val-fraction", "0.1",
                    "--optimizer", "cocd", "--budget", "256", "--weight-decay", "0.0001", "--batch-size", "128",
                    "--trials", str(trials), "--steps", str(steps), "--eval-every", str(steps // 3), "--grace-steps",
                    str(steps), "--concurrent", str(concurrent), "--out", out], check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((Path(out) / "tune.json").read_text())
    best = json.loads((Path(out) / "best.json").read_text())
    return {"concurrent": concurrent, "threads_per_trial": summary["threads_per_trial"],
            "seconds": summary["seconds"], "trials_per_minute": summary["trials_per_minute"],
            "best_val_loss": best["val_loss"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        artifact = Path(work) / "paper-cnn"
        subprocess.run([sys.executable, "-m", "edgezo.cli", "export", "--model", "paper-cnn", "--out", artifact],
                       check=True, stdout=subprocess.DEVNULL)
        rows = []
        for concurrent in (1, 2):
            rows.append(tune(artifact, Path(work) / f"c{concurrent}", concurrent, args.trials, args.steps))
            r = rows[-1]
            print(f"--concurrent {concurrent} ({r['threads_per_trial']} threads each): {r['trials_per_minute']:.2f} "
                  f"trials/min, {r['seconds']:.0f} s, best val loss {r['best_val_loss']:.5f}", flush=True)
    ratio = rows[1]["trials_per_minute"] / rows[0]["trials_per_minute"]
    print(f"2 concurrent / 1 concurrent: {ratio:.2f}x trials per minute on {os.cpu_count()} cores")
    result = {"cores": os.cpu_count(), "trials": args.trials, "steps": args.steps, "runs": rows,
              "speedup_2_over_1": ratio}
    (ROOT / "benchmarks" / "results" / "tune_scaling.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
