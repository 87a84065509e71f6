"""Time per epoch at the paper's Table 2 settings on this machine, next to the paper's GPU numbers.

CoCD steps are timed over one full coordinate cycle (n / B steps: every layer's share of the step count),
on real batches, and scaled to the paper's epoch: SARCOS 696 steps (44,484 rows, batch 64), MNIST 469
(60,000 rows, batch 128). ResNet-20 (B 2048, batch 128; 133 steps a cycle) is timed on --resnet-steps steps
spread evenly over its cycle. Nothing else may run meanwhile (the numbers are wall-clock).

Usage: python benchmarks/paper_time.py [--threads 2] [--resnet-steps 3]
Writes benchmarks/results/paper_time.json.
"""
import argparse
import time

import numpy as np

from common import SHARED, builtin_artifact, write_json
from edgezo.runtime import data as data_mod
from edgezo.runtime import load_artifact
from edgezo.runtime.optim import CoCD
from paper import WD
from paper_data import mnist_data, padded_fashion, sarcos_data

PAPER = {"sarcos": 6.12, "mnist": 44.56}  # Table 2, seconds per epoch on the authors' GPU


def time_steps(art, opt, data, batch, positions):
    """Seconds of each CoCD step started at the given refresh positions (one real batch each)."""
    order = data_mod.epoch_order(data_mod.num_rows(data), 0, 0)
    seconds = []
    for k, position in enumerate(positions):
        opt.refreshed = int(position)
        rows = order[(k * batch) % (len(order) - batch):][:batch]
        batch_data = data_mod.take(data, rows)
        inputs = {n: batch_data[n] if n in batch_data else batch_data["x"] for n in art.input_names}
        targets = {n: batch_data[n] if n in batch_data else batch_data["y"] for n in art.target_names}
        start = time.perf_counter()
        probe = opt.ask()
        losses = art.losses(opt.params, probe, inputs, targets)
        opt.tell(losses)
        seconds.append(time.perf_counter() - start)
    return seconds


def case(name, model, data, batch, budget, gamma, eps, lr, threads, steps=None):
    art = load_artifact(builtin_artifact(model), device="cpu", threads=threads)
    params = art.initial_params()
    opt = CoCD(params, lr=lr, eps=eps, budget=budget, gamma=gamma, weight_decay=WD)
    cycle = -(-art.num_params // budget)
    positions = np.arange(cycle) * budget if steps is None else np.linspace(0, art.num_params, steps,
                                                                             endpoint=False).astype(int)
    time_steps(art, opt, data, batch, positions[:1])  # warm-up: engine build, sessions
    seconds = time_steps(art, opt, data, batch, positions)
    per_step = float(np.mean(seconds))
    print(f"{name}: {1e3 * per_step:.1f} ms per step over {len(seconds)} steps ({cycle} a cycle)", flush=True)
    return {"model": model, "params": art.num_params, "budget": budget, "batch": batch, "steps_timed": len(seconds),
            "steps_per_cycle": cycle, "seconds_per_step": per_step, "step_seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resnet-steps", type=int, default=3)
    args = parser.parse_args()
    sarcos_train, _ = sarcos_data(SHARED / "datasets" / "sarcos" / "sarcos_inv_test.mat")
    mnist_train, _ = mnist_data(SHARED / "datasets" / "mnist")
    results = {"threads": args.threads}
    results["sarcos"] = case("SARCOS MLP CoCD B=64", "sarcos-mlp", sarcos_train, 64, 64, 1.0, 1.0, 1e-3, args.threads)
    results["mnist"] = case("MNIST paper-cnn CoCD B=256", "paper-cnn", mnist_train, 128, 256, 0.99, 0.1, 1e-2,
                            args.threads)
    results["mnist_cnn"] = case("MNIST mnist-cnn CoCD B=256", "mnist-cnn", mnist_train, 128, 256, 0.99, 0.1, 1e-2,
                                args.threads)
    for key, steps in (("sarcos", 696), ("mnist", 469), ("mnist_cnn", 469)):
        r = results[key]
        r["paper_epoch_steps"] = steps
        r["seconds_per_epoch"] = r["seconds_per_step"] * steps
        paper = PAPER["sarcos" if key == "sarcos" else "mnist"]
        r["paper_gpu_seconds_per_epoch"], r["ratio_to_paper"] = paper, r["seconds_per_epoch"] / paper
        print(f"{key}: {r['seconds_per_epoch']:.1f} s per paper epoch ({steps} steps) vs the paper's GPU {paper} s: "
              f"{r['ratio_to_paper']:.1f}x", flush=True)
    if args.resnet_steps:
        train, _ = padded_fashion(limit=1)
        r = case("ResNet-20 CoCD B=2048", "resnet20", train, 128, 2048, 0.99, 0.1, 1e-2, args.threads,
                 steps=args.resnet_steps)
        r["seconds_per_epoch"] = r["seconds_per_step"] * 469  # 60,000 images, batch 128
        print(f"ResNet-20: {r['seconds_per_step']:.1f} s per step, {r['seconds_per_epoch'] / 3600:.1f} h per "
              "epoch (469 steps)", flush=True)
        results["resnet20"] = r
    write_json("paper_time", results)


if __name__ == "__main__":
    main()
