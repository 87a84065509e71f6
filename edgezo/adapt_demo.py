"""`edgezo demo` (the default task): adapt a deployed image classifier forward-only, on the device.

The deployed model is edgezo/assets/digits_mobilenet.onnx, a small MobileNet-style digit classifier with
BatchNorm (94.9% on MNIST; made with backprop by examples/make_demo_model.py). On the device it meets a new
label set: Fashion-MNIST clothing images (../shared/datasets). `export-onnx --num-classes 10 --last-layers 1`
gives it a fresh, seeded 10-way head and makes only that head trainable (330 of 2,954 weights); the frozen
backbone runs once per step (the engine's frozen prefix). CoCD, BCCD and MeZO (the same 132 evaluations per
step) adapt it in torch-free `edgezo train` subprocesses, two at a time; torch SGD with momentum (backprop through the ONNX
graph, best lr of a small grid) trains the same tensors as the first-order reference. All see the same 1,024
images for the same epochs; accuracy is on 1,000 test images. Writes OUT/demo.json, OUT/accuracy.png and the
adapted model OUT/cocd/trained.onnx.

--task int8: the same model as a device runs it, int8 (onnxruntime's quantize_static, QDQ per channel, calibrated
on 256 MNIST digits), gets a fresh 10-way head that is int8 from the start; the forward-only methods train it
and write it back as int8, and every accuracy is measured on that written-back int8 file. Backprop cannot train
the int8 graph (no gradient for DequantizeLinear); torch SGD trains the head of the fp32 model instead, the
accuracy a device would reach only by running float.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .runtime.data import load_idx_pair

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path(__file__).with_name("assets") / "digits_mobilenet.onnx"
FASHION = ROOT / ".." / "shared" / "datasets" / "fashion-mnist"
TRAIN_ROWS, TEST_ROWS, BATCH = 1024, 1000, 64
ZO = {  # name: edgezo train arguments; CoCD's from a sweep of B, lr, gamma on this data (README), MeZO at the
    # same 132 evaluations per step
    "CoCD": ["--optimizer", "cocd", "--budget", "66", "--lr", "0.03", "--eps", "0.05", "--gamma", "0.95",
             "--engine-memory-mb", "64"],
    "BCCD": ["--optimizer", "bccd", "--budget", "66", "--lr", "0.03", "--eps", "0.05", "--engine-memory-mb", "64"],
    "MeZO": ["--optimizer", "mezo", "--directions", "66", "--lr", "0.01", "--mu", "0.01"],
}
SGD_LRS = ("0.01", "0.03", "0.1")
REFERENCE = ("torch eager backprop through edgezo's ONNX-to-torch interpreter (edgezo train-torch), not an on-device "
             "runtime")


def make_data(out, folder=FASHION):
    x, y = load_idx_pair(folder / "train-images-idx3-ubyte.gz")
    xt, yt = load_idx_pair(folder / "t10k-images-idx3-ubyte.gz")
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "train.npz", image=x[:TRAIN_ROWS], target=y[:TRAIN_ROWS].astype(np.int64))
    np.savez(out / "test.npz", image=xt[:TEST_ROWS], target=yt[:TEST_ROWS].astype(np.int64))
    return out / "train.npz", out / "test.npz"


def edgezo(args, log_path):
    """One `edgezo` CLI run in a fresh process; its output goes to log_path."""
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "edgezo.cli", *map(str, args)], stdout=log,
                                stderr=subprocess.STDOUT)


def summary(metrics, before):
    history = metrics["history"]
    return {"accuracy_before": before, "accuracy_after": history[-1]["val_accuracy"],
            "accuracy_per_epoch": [h["val_accuracy"] for h in history], "seconds": metrics["seconds"],
            "peak_rss_mb": metrics["peak_rss_mb"], "rss_rise_mb": metrics.get("rss_rise_mb"),
            "torch_imported": metrics["torch_imported"], "settings": metrics["settings"]}


def run_all(artifact, train, test, out, epochs, float_artifact=None):
    """All runs, two processes at a time (2 cores): each in its own process. Returns {name: metrics}.
    float_artifact: where backprop trains (the fp32 model's, when `artifact` is an int8 model's)."""
    common = ["--data", train, "--val-data", test, "--batch-size", BATCH, "--epochs", epochs]
    jobs = [(name, ["train", artifact, *common, *extra]) for name, extra in ZO.items()]
    jobs += [(f"SGD lr={lr}", ["train-torch", float_artifact or artifact, *common, "--optimizer", "momentum",
                               "--lr", lr]) for lr in SGD_LRS]
    results = {}
    for pair in (jobs[i:i + 2] for i in range(0, len(jobs), 2)):
        procs = [(name, edgezo([*args, "--out", out / _folder(name)], out / f"{_folder(name)}.log"))
                 for name, args in pair]
        for name, proc in procs:
            check(proc.wait(), out / f"{_folder(name)}.log")
            results[name] = json.loads((out / _folder(name) / "metrics.json").read_text())
            print(f"  {name}: {100 * results[name]['history'][-1]['val_accuracy']:.1f}% "
                  f"({results[name]['seconds']:.1f} s)", flush=True)
    return results


def _folder(name):
    return name.lower().replace(" lr=", "_lr")


def check(code, log_path):
    if code != 0:
        tail = Path(log_path).read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"a demo run failed ({log_path}):\n" + "\n".join(tail))


def plot(methods, path, epochs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    steps = TRAIN_ROWS // BATCH
    for name, m in methods.items():
        xs = [0] + [steps * (e + 1) for e in range(len(m["accuracy_per_epoch"]))]
        ax.plot(xs, [100 * m["accuracy_before"]] + [100 * a for a in m["accuracy_per_epoch"]], label=name,
                lw=2.2 if name == "CoCD" else 1.3)
    ax.set_xlabel(f"steps (batch {BATCH}; {epochs} epochs of {TRAIN_ROWS} images)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Deployed digit classifier adapted to Fashion-MNIST: new 10-way head (330 weights)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quantize_model(out):
    """The demo model as a device runs it: int8 QDQ, per channel, calibrated on 256 MNIST digits."""
    from .exporters.quantize import quantize_static_int8
    x, _ = load_idx_pair(FASHION.parent / "mnist" / "train-images-idx3-ubyte.gz")
    return quantize_static_int8(MODEL, out, [{"image": x[i:i + 32]} for i in range(0, 256, 32)])


def deployed_accuracy(path, test):
    """Accuracy of a written-back model file in onnxruntime (the int8 file itself, not the training graph)."""
    from .runtime.sessions import make_session
    data = np.load(test)
    logits = make_session(str(path), "cpu").run(None, {"image": data["image"]})[0]
    return float(np.mean(logits.argmax(1) == data["target"]))


def run_adapt_demo(out, epochs=20, task="adapt"):
    from .exporters.onnx_import import export_onnx
    from .runtime import load_artifact
    from .runtime.train import evaluate
    start = time.perf_counter()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    train, test = make_data(out / "data")
    int8 = task == "int8"
    model = quantize_model(out / "data" / "digits_mobilenet_int8.onnx") if int8 else MODEL
    head = dict(last_layers=1, num_classes=10, seed=0, log=lambda line: None)
    artifact = export_onnx(model, out / "artifact", "cross_entropy", **head)
    fp32_artifact = export_onnx(MODEL, out / "artifact_fp32", "cross_entropy", **head) if int8 else None
    art = load_artifact(artifact, device="cpu")
    from .runtime.data import load_data
    before = evaluate(art, art.initial_params(), load_data(test, art.manifest))["accuracy"]
    print(f"deployed model {model.name}: new 10-way {'int8 ' if int8 else ''}head for Fashion-MNIST, "
          f"{art.num_params} trainable weights; test accuracy before {100 * before:.1f}%", flush=True)
    results = run_all(artifact, train, test, out, epochs, fp32_artifact)
    if int8:  # the accuracy of the int8 file each method wrote back
        for name in ZO:
            results[name]["history"][-1]["val_accuracy"] = deployed_accuracy(out / _folder(name) / "trained.onnx",
                                                                             test)
    methods = {name: summary(m, before) for name, m in results.items() if not name.startswith("SGD")}
    grid = {name: summary(m, before) for name, m in results.items() if name.startswith("SGD")}
    best = max(grid, key=lambda k: grid[k]["accuracy_after"])
    sgd = "SGD (fp32 backprop)" if int8 else "SGD (backprop)"
    methods[sgd] = dict(grid[best], lr=best.split("=")[1], grid={k: v["accuracy_after"] for k, v in grid.items()},
                        reference=REFERENCE)
    plot(methods, out / "accuracy.png", epochs)
    sgd_gain = methods[sgd]["accuracy_after"] - before
    print(f"\n{'method':<16} {'before':>7} {'after':>7} {'gain vs SGD':>11} {'seconds':>8} {'peak RSS':>9} "
          f"{'RSS rise':>9}  torch")
    for name, m in methods.items():
        gain = (m["accuracy_after"] - before) / sgd_gain if sgd_gain > 0 else float("nan")
        m["gain_vs_backprop"] = gain
        print(f"{name:<16} {100 * m['accuracy_before']:>6.1f}% {100 * m['accuracy_after']:>6.1f}% {100 * gain:>10.0f}% "
              f"{m['seconds']:>8.1f} {m['peak_rss_mb']:>7.0f} MB {m['rss_rise_mb']:>6.0f} MB  {m['torch_imported']}")
    print(f"(SGD momentum 0.9: best lr {methods[sgd]['lr']} of {', '.join(SGD_LRS)}; seconds: the training loop of "
          "each process, two processes at a time" + ("; int8: accuracy of the written-back int8 file; backprop "
                                                      "cannot train the int8 graph: SGD trains the fp32 model's head)"
                                                      if int8 else ")"))
    print(f"SGD's seconds and memory are {REFERENCE}; against ONNX Runtime's on-device training on this task and "
          "deeper ones: benchmarks/ort_training.py (docs/results.md)")
    result = {"model": model.name, "task": f"Fashion-MNIST with a new 10-way{' int8' if int8 else ''} head",
              "trainable": art.num_params,
              "epochs": epochs, "train_rows": TRAIN_ROWS, "test_rows": TEST_ROWS, "methods": methods,
              "seconds": time.perf_counter() - start}
    (out / "demo.json").write_text(json.dumps(result, indent=1))
    print(f"\naccuracy curves: {out / 'accuracy.png'}; adapted model: {out / 'cocd' / 'trained.onnx'}; "
          f"summary: {out / 'demo.json'} ({result['seconds']:.0f} s)")
    return result
