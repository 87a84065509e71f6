"""Adapting the int8 model a device runs, forward-only, written back as int8.

The classifier: the MobileNetV3-small-like test architecture (benchmarks/deployed.py, width 0.5: depthwise
convolutions, squeeze-excitation, hardswish), trained with backprop (torch Adam, 2 epochs) on Fashion-MNIST
padded to 3x32x32, exported to ONNX and quantized to int8 QDQ per channel with onnxruntime's quantize_static
(calibrated on 256 training images). The device meets a shifted domain, not new labels: the same clothes seen by
a dimmer, noisier sensor (contrast x0.6, +0.25, Gaussian noise 0.1, clipped to [0, 1]). A domain shift keeps the
classes, so the int8 model's own head and its scales and biases can adapt (a new label set needs a fresh head,
which --num-classes gives float models). Runs, each `edgezo train` in its own process on 2,048 shifted training
images, scored on 2,000 shifted test images (int8: the written-back int8 file, in onnxruntime):
  int8 --scales --biases, int8 --last-layers 1 (head), fp32 --norms --biases (the float analogue of scales and
  biases: a BatchNorm scale is a per-channel weight scale), fp32 head, and fp32 backprop (torch SGD momentum)
  on the same float tensors.
Recovery: the int8 file a vendor ships when it quantized without representative data: Conv+BatchNorm folded
(quant_pre_process), per-channel QDQ calibrated on 64 Gaussian-noise inputs (no images at hand). On the clean test
set beside fp32, beside the fix a user with the float model tries first (re-calibrating on 256 real images), then
on the device, with the int8 file alone: --scales --biases and the head, CoCD on 2,048 clean training images.
Per-tensor weights calibrated on 32 images (depthwise convolutions are the textbook weak spot) and re-calibrated
on 2,048 are reported too: on this classifier they lose under a point.
Staircase: with activations fake-quantized the loss is flat in a scale between quantization steps; the share of
scale coordinates whose central difference is exactly 0, per eps, says how large eps must be.

    python benchmarks/lowprec.py [--out runs/lowprec] [--epochs 5]   -> benchmarks/results/lowprec.json
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import train_flags  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"
SHIFT = dict(contrast=0.6, offset=0.25, noise=0.1)
ROWS, TEST_ROWS, BATCH = 2048, 2000, 64


def fashion():
    from paper_data import padded_fashion
    train, test = padded_fashion()
    return train, test


def shifted(x, seed):
    rng = np.random.default_rng(seed)
    noisy = SHIFT["contrast"] * x + SHIFT["offset"] + rng.normal(0, SHIFT["noise"], x.shape)
    return np.clip(noisy, 0, 1).astype(np.float32)


def train_model(out, epochs=2):
    """fp32.onnx: the classifier trained with backprop (the one time torch is needed)."""
    import torch
    from deployed import MobileNetV3Small
    train, test = fashion()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = MobileNetV3Small(classes=10, width=0.5, hidden=256)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = torch.from_numpy(train["x"]), torch.from_numpy(train["y"].astype(np.int64))
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        model.train()
        for i in range(0, len(x), 128):
            rows = order[i:i + 128]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(torch.from_numpy(test["x"][:TEST_ROWS])).argmax(1).numpy() == test["y"][:TEST_ROWS]).mean()
        print(f"  backprop epoch {epoch + 1}: clean test accuracy {100 * acc:.1f}%", flush=True)
    torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), str(out), dynamo=False, opset_version=17,
                      do_constant_folding=False, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})


def quantize(source, out, x, per_channel):
    """int8 QDQ of `source` calibrated on the rows x."""
    from edgezo.exporters.quantize import quantize_static_int8
    quantize_static_int8(source, out, [{"x": x[i:i + 32]} for i in range(0, len(x), 32)], per_channel)


def accuracy(model_path, data):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return float(np.mean(session.run(None, {"x": data["x"]})[0].argmax(1) == data["target"]))


HAND = {"lr": 0.02, "eps": 0.05, "gamma": 0.95}  # CoCD's hand settings (the tune tries them first)


def edgezo(*args, log=None):
    with open(log, "w") if log else open("/dev/null", "w") as out:
        proc = subprocess.run([sys.executable, "-m", "edgezo.cli", *map(str, args)], stdout=out,
                              stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"edgezo {' '.join(map(str, args[:3]))} failed: see {log}")


def adapt(work, name, model, selection, train, test, train_args, backprop=None):
    """export-onnx + train (or train-torch) in fresh processes; accuracy of the written-back file."""
    art, run = work / f"{name}_art", work / f"{name}_run"
    if not (run / "metrics.json").exists():
        if not art.exists():
            edgezo("export-onnx", model, *selection, "--loss", "cross_entropy", "--out", art, log=work / f"{name}.log")
        common = ["--data", train, "--batch-size", BATCH, "--out", run]
        if backprop:
            edgezo("train-torch", art, *common, *backprop, log=work / f"{name}_train.log")
        else:
            edgezo("train", art, *common, *train_args, log=work / f"{name}_train.log")
    metrics = json.loads((run / "metrics.json").read_text())
    written = run / "trained.onnx"
    if not written.exists():  # train-torch leaves params only: write them back the same way
        edgezo("write-back", art, run / "params.npy", "--out", written, log=work / f"{name}_wb.log")
    data = dict(np.load(test))
    manifest = json.loads((art / "manifest.json").read_text())
    return {"selection": " ".join(selection), "trainable": manifest["num_params"],
            "accuracy": accuracy(written, data), "seconds": metrics["seconds"], "peak_rss_mb": metrics["peak_rss_mb"],
            "rss_rise_mb": metrics.get("rss_rise_mb"), "torch_imported": metrics.get("torch_imported")}


def staircase(art, data, eps_values=(1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), coords=64):
    """Share of scale log-factor coordinates whose central difference is exactly zero, per eps."""
    from edgezo.runtime import load_artifact
    from edgezo.runtime.probes import CoordinateProbe
    artifact = load_artifact(art, "cpu", engine="naive")
    params = artifact.initial_params()
    scales = [e for e in artifact.manifest["trainable"] if e["name"].endswith("__log_factor")]
    index = np.concatenate([np.arange(e["offset"], e["offset"] + e["size"]) for e in scales])
    picks = np.random.default_rng(0).choice(index, min(coords, len(index)), replace=False)
    feed = artifact.feeds(data["x"][:256], data["target"][:256])
    out = {}
    for eps in eps_values:
        index = np.repeat(picks, 2)
        delta = np.tile(np.array([eps, -eps], np.float32), len(picks))
        losses = artifact.naive_losses(params, CoordinateProbe(index, delta), feed)
        diffs = losses[0::2] - losses[1::2]
        out[str(eps)] = float(np.mean(diffs == 0))
    return out


RECOVERY = ["--optimizer", "cocd", "--budget", "64", "--lr=0.0003", "--eps=0.02", "--gamma=0.93", "--epochs", "6"]
ACTIVATIONS = ["--optimizer", "cocd", "--budget", "64", "--lr=0.003", "--eps=0.05", "--gamma=0.9", "--epochs", "3"]


def recovery(work, before):
    """Points lost by the noise-calibrated int8 file against fp32 (clean test), what re-calibrating the float model
    on real images gives back, and what forward-only adaptation of the int8 file alone gives back."""
    def lost(name):
        return 100 * (before["fp32.onnx"]["clean"] - before[name]["clean"])
    out = {"points_lost": {k: lost(k) for k in ("int8.onnx", "int8_per_tensor.onnx", "int8_recalibrated.onnx",
                                                 "int8_folded.onnx", "int8_noise_calibrated.onnx")}}
    ct, cv, model = work / "clean_train.npz", work / "clean_test.npz", work / "int8_noise_calibrated.onnx"
    rows = (("--scales --biases", ["--scales", "--biases"], RECOVERY), ("head", ["--last-layers", "1"], RECOVERY),
            ("--activation-scales", ["--activation-scales"], ACTIVATIONS))
    for i, (label, selection, settings) in enumerate(rows):
        r = out[label] = adapt(work, f"r{i}", model, selection, ct, cv, settings)
        r["points_recovered"], r["settings"] = 100 * (r["accuracy"] - before["int8_noise_calibrated.onnx"]["clean"]), \
            settings
        print(f"  recovery, int8 {label:<20} {100 * r['accuracy']:5.1f}%  {r['seconds']:6.1f} s", flush=True)
    out["activation_scales_set_to_recalibrated"] = oracle(work / "r2_art", model, work / "int8_folded.onnx", cv)
    return out


def oracle(art, model, recalibrated, test):
    """The --activation-scales artifact's accuracy with each log-factor at log(recalibrated scale / its scale): what
    the selection can reach, whatever the optimizer."""
    import onnx
    from onnx import numpy_helper
    from edgezo.runtime import load_artifact
    scales = [{t.name: numpy_helper.to_array(t) for t in onnx.load(m).graph.initializer} for m in (model, recalibrated)]
    artifact, data = load_artifact(art, "cpu", engine="naive"), dict(np.load(test))
    params = artifact.initial_params()
    for e in artifact.manifest["trainable"]:
        name = e["name"].removesuffix("__log_factor")
        params[e["offset"]] = np.log(scales[1][name] / scales[0][name])
    loss, out = artifact.outputs(params, data["x"], data["target"])
    return {"loss": loss, "accuracy": float(np.mean(out.argmax(1) == data["target"]))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/lowprec")
    p.add_argument("--epochs", type=int, default=5, help="forward-only epochs over the 2,048 images")
    p.add_argument("--stage", choices=("model", "recovery", "all"), default="all",
                   help="model: train fp32.onnx only; recovery: the recovery runs only, merged into the last JSON")
    p.add_argument("--tuned", help="a folder for `edgezo tune` of CoCD on the int8 --scales --biases artifact "
                   "(--tune-trials trials of 320 steps on 80%% of the shifted training images, the hand settings "
                   "tried first; kept if it exists): its best lr/eps/gamma train the whole-network selections "
                   "again, --long-epochs epochs")
    p.add_argument("--tune-trials", type=int, default=12)
    p.add_argument("--long-epochs", type=int, default=40)
    args = p.parse_args()
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "fp32.onnx").exists():
        train_model(work / "fp32.onnx")
    if args.stage == "model":
        return
    train, test = fashion()
    sets = {"shift_train": {"x": shifted(train["x"][:ROWS], 1), "target": train["y"][:ROWS].astype(np.int64)},
            "shift_test": {"x": shifted(test["x"][:TEST_ROWS], 2), "target": test["y"][:TEST_ROWS].astype(np.int64)},
            "clean_train": {"x": train["x"][-ROWS:], "target": train["y"][-ROWS:].astype(np.int64)},
            "clean_test": {"x": test["x"][:TEST_ROWS], "target": test["y"][:TEST_ROWS].astype(np.int64)}}
    for name, d in sets.items():
        np.savez(work / f"{name}.npz", **d)
    if not (work / "fp32_folded.onnx").exists():  # Conv+BatchNorm folded, as onnxruntime advises before quantizing
        from onnxruntime.quantization.shape_inference import quant_pre_process
        quant_pre_process(str(work / "fp32.onnx"), str(work / "fp32_folded.onnx"))
    noise = np.random.default_rng(0).standard_normal((64, *train["x"].shape[1:])).astype(np.float32)
    quantized = {"int8.onnx": ("fp32.onnx", True, train["x"][:256]),
                 "int8_per_tensor.onnx": ("fp32.onnx", False, train["x"][:32]),
                 "int8_recalibrated.onnx": ("fp32.onnx", False, train["x"][:2048]),
                 "int8_noise_calibrated.onnx": ("fp32_folded.onnx", True, noise),
                 "int8_folded.onnx": ("fp32_folded.onnx", True, train["x"][:256])}
    for name, (source, per_channel, rows) in quantized.items():
        if not (work / name).exists():
            quantize(work / source, work / name, rows, per_channel)
    zo = ["--optimizer", "cocd", "--budget", "64", *[f"--{k}={v}" for k, v in HAND.items()], "--epochs", args.epochs]
    sgd = ["--optimizer", "momentum", "--lr", "0.01", "--epochs", args.epochs]
    fp32, int8 = work / "fp32.onnx", work / "int8.onnx"
    st, sv = work / "shift_train.npz", work / "shift_test.npz"
    result = {"shift": SHIFT, "rows": ROWS, "test_rows": TEST_ROWS, "batch": BATCH, "cocd": zo, "sgd": sgd,
              "before": {k: {"clean": accuracy(work / k, sets["clean_test"]), "shifted": accuracy(work / k, sets["shift_test"])}
                         for k in ("fp32.onnx", *quantized)}}
    print(json.dumps(result["before"]), flush=True)
    if args.stage == "recovery":
        last = json.loads((RESULTS / "lowprec.json").read_text())
        last.update(before=result["before"], recovery=recovery(work, result["before"]))
        (RESULTS / "lowprec.json").write_text(json.dumps(last, indent=1))
        return
    runs = {"int8 --scales --biases": (int8, ["--scales", "--biases"], None),
            "int8 head": (int8, ["--last-layers", "1"], None),
            "fp32 --norms --biases": (fp32, ["--norms", "--biases"], None),
            "fp32 head": (fp32, ["--last-layers", "1"], None),
            "fp32 backprop --norms --biases": (fp32, ["--norms", "--biases"], sgd),
            "fp32 backprop head": (fp32, ["--last-layers", "1"], sgd)}
    result["adapt"] = {}
    for i, (label, (model, selection, backprop)) in enumerate(runs.items()):
        start = time.perf_counter()
        result["adapt"][label] = adapt(work, f"a{i}", model, selection, st, sv, zo, backprop)
        r = result["adapt"][label]
        print(f"  {label:<32} {100 * r['accuracy']:5.1f}%  {r['seconds']:6.1f} s  peak {r['peak_rss_mb']:.0f} MiB "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    if args.tuned:  # forward-only over thousands of coordinates: tuned settings and more steps
        if not (Path(args.tuned) / "best.json").exists():
            edgezo("tune", work / "a0_art", "--data", st, "--val-fraction", 0.2, "--optimizer", "cocd", "--budget", 64,
                   "--batch-size", BATCH, "--trials", args.tune_trials, "--steps", 320, "--eval-every", 32,
                   "--try", ",".join(f"{k}={v}" for k, v in HAND.items()), "--out", args.tuned, log=work / "tune.log")
        best = json.loads((Path(args.tuned) / "best.json").read_text())
        trials = json.loads((Path(args.tuned) / "tune.json").read_text())["trials"]
        tuned = ["--optimizer", "cocd", "--budget", "64", "--epochs", args.long_epochs,
                 *train_flags(best["settings"])]
        result["tuned"] = {"settings": best["settings"], "tune_val_loss": best["val_loss"], "cocd": tuned, "adapt": {},
                           "trials": len(trials), "hand_settings_val_loss": next(
                               (t["val_loss"] for t in trials if t["settings"] == HAND), None)}
        for i, label in enumerate(("int8 --scales --biases", "fp32 --norms --biases", "int8 head")):
            model, selection, _ = runs[label]
            r = result["tuned"]["adapt"][label] = adapt(work, f"t{i}", model, selection, st, sv, tuned)
            print(f"  tuned, {args.long_epochs} epochs: {label:<24} {100 * r['accuracy']:5.1f}%", flush=True)
    result["recovery"] = recovery(work, result["before"])
    print(f"  recovery: {json.dumps(result['recovery'])}", flush=True)
    result["staircase_zero_share"] = staircase(work / "a0_art", sets["shift_test"])
    print(f"  staircase: {result['staircase_zero_share']}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lowprec.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
