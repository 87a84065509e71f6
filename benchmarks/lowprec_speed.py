"""ms per CoCD step (B = 16) on int8 and fp16 versions of the deployed test architectures, side by side with
fp32: the engine (auto) vs the same engine with its calls one at a time (serial: no fanout, onnxruntime's intra-op
threads instead) vs the naive path (one onnxruntime call per perturbation, 2 threads), timed in turn on each step,
and one plain forward of the deployed file. MobileNetV3-small-like at 96 px batch 32 and the 2-block transformer at
batch 32 (benchmarks/deployed.py); int8: onnxruntime's quant_pre_process then quantize_static, QDQ, per channel
(calibrated on 64 random rows); fp16: onnxruntime's converter (keep_io_types). Selections: the head (the last Linear, quantized by the
quantizer: an int8 head) and, on int8, --scales over the whole network. Targets: head >= 5x naive, --scales
>= 2x naive. Steps spread across the coordinate cycle; naive on a sample of rows (said in the output).

    python benchmarks/lowprec_speed.py [--models mobilenetv3_small transformer] [--steps 8]
    (--steps 62: the transformer's whole --scales cycle)
Run it alone: other work on a 2-core machine distorts timings. Writes benchmarks/results/lowprec_speed.json.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import ARTIFACTS, RESULTS, write_json
from step_speed import forward_ms, probes_at, sample_rows, timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
MODELS = {"mobilenetv3_small": (dict(side=96), 32), "transformer": ({}, 32)}
RUNS = [("fp32", "head"), ("int8", "head"), ("int8", "scales"), ("fp16", "head"), ("fp16io", "head")]


def model_files(model, size):
    """fp32, int8 (QDQ per channel) and fp16 versions of a deployed architecture, made once."""
    from deployed import export
    folder = ARTIFACTS / f"lowprec-{model}"
    folder.mkdir(parents=True, exist_ok=True)
    files = {p: folder / f"{p}.onnx" for p in ("fp32", "int8", "fp16", "fp16io")}
    if not files["fp32"].exists():
        export(model, files["fp32"], **size)
    shape = __import__("onnx").load(files["fp32"]).graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value for d in shape[1:]]
    if not files["int8"].exists():
        from onnxruntime.quantization.shape_inference import quant_pre_process
        from edgezo.exporters.quantize import quantize_static_int8
        rng = np.random.default_rng(0)
        # onnxruntime's advice, and needed here: without it the legacy exporter's Transpose(weight) before each
        # MatMul stays an activation, quantized per tensor at run time, and the weights stay float
        quant_pre_process(str(files["fp32"]), str(folder / "fp32_preprocessed.onnx"))
        quantize_static_int8(folder / "fp32_preprocessed.onnx", files["int8"],
                             [{"x": rng.standard_normal((16, *shape)).astype(np.float32)} for _ in range(4)])
    if not files["fp16"].exists():
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
        onnx.save(convert_float_to_float16(onnx.load(files["fp32"]), keep_io_types=True), files["fp16"])
    if not files["fp16io"].exists():  # fp16 inputs and outputs too
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
        onnx.save(convert_float_to_float16(onnx.load(files["fp32"]), keep_io_types=False), files["fp16io"])
    return files, shape


def artifact(files, precision, selection):
    from edgezo.exporters.onnx_import import export_onnx
    path = files[precision].with_name(f"{precision}-{selection}")
    if not (path / "manifest.json").exists():
        kw = dict(scales=True) if selection == "scales" else dict(last_layers=1)
        export_onnx(files[precision], path, "cross_entropy", log=lambda line: None, **kw)
    return path


def interleaved_ms(arts, params, probes, sample, x, y, label, repeat=3):
    """{engine: ms per step} over the probes, the engines timed in turn on each step (the best of `repeat` each,
    after an untimed call: see step_speed.step_ms), naive on `sample` rows scaled to the step. This 2-core machine's
    speed drifts ~30% within minutes: timing one engine after the other reads that drift as a speedup."""
    total = dict.fromkeys(arts, 0.0)
    for probe in probes:
        for engine, art in arts.items():
            p = sample_rows(probe, sample) if engine == "naive" and sample < len(probe) else probe
            art.losses(params, p, x, y)
            total[engine] += min(timed(lambda: art.losses(params, p, x, y)) for _ in range(repeat)) \
                * len(probe) / len(p)
    out = {engine: 1000 * t / len(probes) for engine, t in total.items()}
    print(f"  {label}: " + ", ".join(f"{e} {ms:.2f}" for e, ms in out.items()) + " ms/step", flush=True)
    return out


def bench(model, steps, sample):
    from edgezo.runtime import load_artifact
    size, batch = MODELS[model]
    files, shape = model_files(model, size)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((batch, *shape)).astype(np.float32), rng.integers(0, 10, batch)
    rows = []
    for precision, selection in RUNS:
        path = artifact(files, precision, selection)
        arts = {"auto": load_artifact(path, device="cpu", threads=2),
                "serial": load_artifact(path, device="cpu", threads=2),  # the engine, its calls one at a time
                "naive": load_artifact(path, device="cpu", threads=2, engine="naive")}
        if arts["serial"].fast_engine() is not None:
            arts["serial"].fast_engine().fan.workers = 1
        params = arts["naive"].initial_params()
        cycle = -(-params.size // 16)
        probes = probes_at(params, 16, np.linspace(0, cycle - 1, min(steps, cycle)).astype(int))
        label = f"{model} {precision} {selection}"
        x = x.astype(np.float16 if precision == "fp16io" else np.float32)
        row = {"model": model, "precision": precision, "selection": selection, "num_params": int(params.size),
               "batch": batch, "steps_timed": len(probes), "naive_rows_timed": min(sample, 32),
               "engine_note": arts["auto"].engine_note}
        ms = interleaved_ms(arts, params, probes, sample, x, y, label)
        row.update({"auto_ms": ms["auto"], "serial_ms": ms["serial"], "naive_ms": ms["naive"]})
        row["paths_taken"] = dict(arts["auto"].paths_taken())
        row["forward_ms"] = forward_ms(path, x)
        row["speedup_vs_naive"] = row["naive_ms"] / row["auto_ms"]
        row["serial_speedup_vs_naive"] = row["naive_ms"] / row["serial_ms"]
        row["target"] = 2.0 if selection == "scales" else 5.0
        row["target_met"] = bool(row["speedup_vs_naive"] >= row["target"])
        print(f"  {label}: {row['speedup_vs_naive']:.1f}x naive (target {row['target']:g}x; calls one at a time "
              f"{row['serial_speedup_vs_naive']:.1f}x), forward {row['forward_ms']:.2f} ms; paths "
              f"{row['paths_taken']}", flush=True)
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=8, help="steps spread across the cycle")
    p.add_argument("--sample", type=int, default=8, help="probe rows timed per naive step (scaled to 2B)")
    args = p.parse_args()
    rows = [row for model in args.models for row in bench(model, args.steps, args.sample)]
    print(f"\n{'model':<18} {'precision':<9} {'selection':<9} {'auto ms':>9} {'serial ms':>9} {'naive ms':>9} "
          f"{'forward':>8} {'speedup':>8} {'serial':>7}")
    for r in rows:
        print(f"{r['model']:<18} {r['precision']:<9} {r['selection']:<9} {r['auto_ms']:>9.2f} {r['serial_ms']:>9.2f} "
              f"{r['naive_ms']:>9.2f} {r['forward_ms']:>8.2f} {r['speedup_vs_naive']:>7.1f}x "
              f"{r['serial_speedup_vs_naive']:>6.1f}x")
    last = RESULTS / "lowprec_speed.json"  # a run of some models keeps the other models' rows
    kept = [r for r in json.loads(last.read_text())["rows"] if r["model"] not in args.models] if last.exists() else []
    write_json("lowprec_speed", {"budget": 16, "rows": kept + rows})


if __name__ == "__main__":
    main()
