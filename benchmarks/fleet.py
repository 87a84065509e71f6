"""Fleet training over Flower (edgezo fleet simulate), measured:

1. bytes per step per device, read off the serialized messages of real fleet runs (messages.jsonl: Flower's own
   protobuf encoding), against federated averaging's per-round messages (the trainable weights down and up, as a
   Flower Message with an ArrayRecord, serialized the same way), for the demo's head and MobileNetV3-small (all
   weights);
2. wall time per step for K = 1, 2, 4 simulated devices, and the same fleet in one process without Flower (the
   core: fleet.Device and fleet.Aggregator), so Flower's share is visible;
3. accuracy of 4 devices each holding its own classes of the demo's Fashion-MNIST data against device 0 alone.

    python benchmarks/fleet.py [--steps 320] [--parts bytes,time,accuracy]

Each run is its own process, one at a time. Writes benchmarks/results/fleet.json and runs/fleet/.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import ROOT, deployed_artifact, write_json

OUT = ROOT / "runs" / "fleet"
COCD = ["--optimizer", "cocd", "--budget", "66", "--lr", "0.03", "--eps", "0.05", "--gamma", "0.95",
        "--engine-memory-mb", "64"]  # the demo's CoCD (edgezo/adapt_demo.py)


def edgezo(*args, log=None):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgezo.cli", *map(str, args)], capture_output=True, text=True)
    if log:
        Path(log).write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"edgezo {' '.join(map(str, args))} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def demo_task():
    """The demo's artifact (the deployed digit classifier with a fresh 10-class head) and Fashion-MNIST data."""
    from edgezo.adapt_demo import MODEL, make_data
    from edgezo.exporters.onnx_import import export_onnx
    OUT.mkdir(parents=True, exist_ok=True)
    train, test = make_data(OUT)
    art = OUT / "demo-artifact"
    if not (art / "manifest.json").exists():
        export_onnx(MODEL, art, "cross_entropy", last_layers=1, num_classes=10, seed=0, log=lambda line: None)
    return art, train, test


def simulate(name, art, data, clients, steps, *flags):
    run = OUT / name
    shutil.rmtree(run, ignore_errors=True)  # a run folder must be new
    edgezo("fleet", "simulate", art, "--data", data, "--clients", clients, "--steps", steps, "--out", run, *flags,
           log=OUT / f"{name}.log")
    return run, json.loads((run / "metrics.json").read_text())


def message_bytes(run):
    """Mean serialized bytes per device of the step messages (the final hash exchange excluded)."""
    lines = [json.loads(line) for line in (run / "messages.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "losses" in line["keys"] or ("means" in line["keys"] and line["way"] == "down")]
    last = max(line["step"] for line in steps)
    mean = {way: float(np.mean([line["bytes"] for line in steps if line["way"] == way and 0 < line["step"] < last]))
            for way in ("down", "up")}  # step 0 carries no mean yet
    return mean


def fedavg_bytes(art):
    """One FedAvg round's messages per device: the trainable tensors down, the same up (a Flower Message with an
    ArrayRecord, serialized by Flower's serde)."""
    from flwr.app import ArrayRecord, Message, Metadata, RecordDict
    from flwr.common.serde import message_to_proto
    from edgezo.runtime.manifest import read
    manifest = read(Path(art) / "manifest.json")
    params = np.load(Path(art) / "params.npy")
    arrays, at = {}, 0
    for t in manifest["trainable"]:
        size = int(np.prod(t["shape"]))
        arrays[t["name"]] = params[at:at + size].reshape(t["shape"])
        at += size
    # outside a running Flower app a Message takes its metadata whole (ids as long as Flower's, 64 hex digits)
    metadata = Metadata(run_id=2 ** 63, message_id="f" * 64, src_node_id=1, dst_node_id=2 ** 63,
                        reply_to_message_id="", group_id="1000", created_at=time.time(), ttl=43200.0,
                        message_type="train")
    down = Message(content=RecordDict({"arrays": ArrayRecord(list(arrays.values()))}), metadata=metadata)
    size = len(message_to_proto(down).SerializeToString())
    return {"down": size, "up": size, "trainable": int(params.size)}


def mnv3_data(path, rows=256):
    """Fashion-MNIST images tiled to MobileNetV3-small's 3 x 64 x 64 input (for message sizes only)."""
    from edgezo.runtime.data import load_idx_pair
    x, y = load_idx_pair(ROOT / ".." / "shared" / "datasets" / "fashion-mnist" / "train-images-idx3-ubyte.gz")
    x = np.pad(x[:rows].reshape(rows, 1, 28, 28), ((0, 0), (0, 0), (2, 2), (2, 2)))
    np.savez(path, x=np.tile(x, (1, 3, 2, 2)).astype(np.float32), y=y[:rows].astype(np.int64))
    return path


def part_bytes(art, train):
    result = {}
    mnv3 = deployed_artifact("mobilenetv3_small", "all")
    for name, artifact, data in (("demo head", art, train), ("MobileNetV3-small, all weights", mnv3,
                                                            mnv3_data(OUT / "mnv3.npz"))):
        for budget in (66, 256):
            run, metrics = simulate(f"bytes-{len(result)}-{budget}", artifact, data, 2, 4, "--budget", budget,
                                    "--batch-size", 16, "--engine", "naive", "--lr", "0.001")
            edgezo_bytes = message_bytes(run)
            fedavg = fedavg_bytes(artifact)
            row = {"trainable": fedavg["trainable"], "budget": budget, "losses_per_step": 2 * budget,
                   "edgezo_step": edgezo_bytes, "fedavg_round": fedavg,
                   "fedavg_over_edgezo": (fedavg["down"] + fedavg["up"]) / sum(edgezo_bytes.values())}
            result[f"{name}, B={budget}"] = row
            print(f"{name} (n={row['trainable']:,}), B={budget}: edgezo {edgezo_bytes['down']:.0f} B down + "
                  f"{edgezo_bytes['up']:.0f} B up per step per device; FedAvg {fedavg['down']:,} B each way per "
                  f"round ({row['fedavg_over_edgezo']:.0f}x)", flush=True)
    return result


def core_seconds(art, train, clients, steps, budget=66):
    """The same fleet in this process without Flower: seconds per step."""
    from edgezo.runtime import load_artifact
    from edgezo.runtime.config import FleetConfig
    from edgezo.runtime.data import load_data
    from edgezo.runtime.fleet import Aggregator, Device
    from edgezo.runtime.fleet_flower import partition
    from edgezo.runtime.run import make_optimizer
    config = FleetConfig(artifact=str(art), optimizer="cocd", budget=budget, lr=0.03, eps=0.05, gamma=0.95,
                         steps=steps, batch_size=32)
    artifact = load_artifact(art, "cpu", threads=1, engine_memory_mb=64)
    data = load_data(train, artifact.manifest)
    devices = [Device(artifact, make_optimizer(config, artifact.initial_params()),
                      partition(data, k, clients, "iid", 0), 32, seed=k) for k in range(clients)]
    aggregator = Aggregator(2 * budget, clients)
    start = time.perf_counter()
    for step in range(steps):
        mean, _ = aggregator.aggregate({k: d.evaluate(step) for k, d in enumerate(devices)})
        for d in devices:
            d.apply(step, mean)
    return (time.perf_counter() - start) / steps


def part_time(art, train, steps=40):
    result = {}
    for k in (1, 2, 4):
        _, metrics = simulate(f"time-k{k}", art, train, k, steps, *COCD, "--batch-size", 32, "--threads", 1)
        flower = metrics["seconds_per_step_after_first"]  # the first step builds the devices
        core = core_seconds(art, train, k, steps)
        result[f"K={k}"] = {"flower_seconds_per_step": flower, "first_step_seconds": metrics["first_step_seconds"],
                            "core_seconds_per_step": core, "flower_overhead_seconds_per_step": flower - core}
        print(f"K={k}: {flower * 1000:.0f} ms per step over Flower's simulation (first step "
              f"{metrics['first_step_seconds']:.1f} s), {core * 1000:.0f} ms in one process without Flower",
              flush=True)
    return result


def part_accuracy(art, train, test, steps):
    from edgezo.runtime.data import load_data
    from edgezo.runtime.fleet_flower import partition
    from edgezo.runtime.manifest import read
    flags = [*COCD, "--batch-size", 32, "--val-data", test]
    _, fleet = simulate("accuracy-fleet4", art, train, 4, steps, *flags, "--partition", "classes",
                        "--eval-every", max(1, steps // 8))
    data = load_data(train, read(Path(art) / "manifest.json"))
    alone_data = OUT / "device0.npz"
    np.savez(alone_data, **partition(data, 0, 4, "classes", 0))
    alone = OUT / "accuracy-alone"
    shutil.rmtree(alone, ignore_errors=True)  # a run folder must be new
    edgezo("train", art, "--data", alone_data, *flags, "--steps", steps, "--eval-every", max(1, steps // 8),
           "--out", alone, log=OUT / "accuracy-alone.log")
    alone_metrics = json.loads((alone / "metrics.json").read_text())
    pooled = OUT / "accuracy-pooled"  # one device holding all four devices' rows, batch 4 x 32
    shutil.rmtree(pooled, ignore_errors=True)  # a run folder must be new
    edgezo("train", art, "--data", train, *COCD, "--batch-size", 128, "--val-data", test, "--steps", steps,
           "--out", pooled, log=OUT / "accuracy-pooled.log")
    pooled_accuracy = json.loads((pooled / "metrics.json").read_text())["history"][-1]["val_accuracy"]
    classes = sorted(set(np.load(alone_data)["target"].tolist()))
    result = {"steps": steps, "batch_per_device": 32, "device0_classes": classes,
              "fleet4_accuracy": fleet["evals"][-1]["val_accuracy"],
              "alone_accuracy": alone_metrics["evals"][-1]["val_accuracy"], "pooled_accuracy": pooled_accuracy,
              "fleet4_curve": fleet["evals"], "alone_curve": alone_metrics["evals"],
              "fleet4_seconds": fleet["seconds"], "alone_seconds": alone_metrics["seconds"]}
    print(f"4 devices, each its own classes: {100 * result['fleet4_accuracy']:.1f}% after {steps} steps; device 0 "
          f"alone (classes {classes}): {100 * result['alone_accuracy']:.1f}%; all rows on one device (batch 128): "
          f"{100 * pooled_accuracy:.1f}%", flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=320, help="steps of the accuracy runs")
    parser.add_argument("--parts", default="bytes,time,accuracy")
    args = parser.parse_args()
    art, train, test = demo_task()
    saved = ROOT / "benchmarks" / "results" / "fleet.json"  # parts not run keep their last results
    result = json.loads(saved.read_text()) if saved.exists() else {}
    result.update({"machine": "2-core CPU, each run alone in its own process", "flwr": __import__("flwr").__version__})
    parts = args.parts.split(",")
    if "bytes" in parts:
        result["bytes"] = part_bytes(art, train)
    if "time" in parts:
        result["time"] = part_time(art, train)
    if "accuracy" in parts:
        result["accuracy"] = part_accuracy(art, train, test, args.steps)
    write_json("fleet", result)


if __name__ == "__main__":
    main()
