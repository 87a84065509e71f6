"""Soak: 10,000 CoCD steps of the SARCOS MLP through onnxruntime; resident memory must not grow.

Prints RSS after warm-up and at the end, and the growth (target: <= 5 MB). Writes
benchmarks/results/soak.json. Usage: python benchmarks/soak.py [--steps 10000] [--warmup 500]
"""
import argparse
import sys
import time

import numpy as np

from common import builtin_artifact, write_json
from edgezo.devices.memory import peak_rss_mb, rss_mb
from edgezo.runtime import CoCD, load_artifact
from edgezo.runtime.train import DivergenceGuard, steps


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    artifact = load_artifact(builtin_artifact("sarcos-mlp"), device="cpu", threads=2)
    params = artifact.initial_params()
    opt = CoCD(params, lr=1e-4, eps=0.1, budget=64, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 21)).astype(np.float32)
    y = rng.standard_normal((4096, 7)).astype(np.float32)

    def batches():
        for step in range(args.steps):
            rows = rng.integers(0, len(x), args.batch_size)
            yield x[rows], y[rows]

    samples, start = [], time.perf_counter()
    for result in steps(artifact, opt, batches(), DivergenceGuard()):
        if result.step == args.warmup:
            baseline = rss_mb()
        if result.step % 1000 == 0:
            samples.append((result.step, rss_mb()))
            print(f"step {result.step}: RSS {samples[-1][1]:.1f} MiB, loss {result.loss:.4f}", flush=True)
    final = rss_mb()
    growth = final - baseline
    seconds = time.perf_counter() - start
    print(f"RSS after warm-up ({args.warmup} steps) {baseline:.1f} MiB, after {args.steps} steps {final:.1f} MiB: "
          f"growth {growth:+.2f} MB (target <= 5), peak {peak_rss_mb():.1f} MiB, {1000 * seconds / args.steps:.2f} "
          f"ms/step, torch imported: {sys.modules.get('torch') is not None}")
    write_json("soak", {"steps": args.steps, "warmup": args.warmup, "rss_after_warmup_mb": baseline,
                        "rss_final_mb": final, "growth_mb": growth, "peak_rss_mb": peak_rss_mb(),
                        "ms_per_step": 1000 * seconds / args.steps, "samples": samples, "pass": growth <= 5})
    return 0 if growth <= 5 else 1


if __name__ == "__main__":
    sys.exit(main())
