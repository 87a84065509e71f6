"""edgezo against ONNX Runtime's on-device training: same source ONNX file, same trainable tensors, same data and
batch order, accuracy against training-loop seconds and steps, peak RSS and its rise.

Sides, each run in its own process:
  ORT AdamW, ORT SGD: onnxruntime-training 1.19.2 in its own venv (`make bench-ort` builds .venv-ort: it replaces
      onnxruntime, needs torch and onnx 1.16), benchmarks/ort_worker.py: generate_artifacts from the case's source
      file and the edgezo artifact's trainable names (cross-entropy), then CheckpointState / Module / Optimizer.
  edgezo CoCD, edgezo MeZO: `edgezo train` (torch-free) on the edgezo artifact of the same file and tensors.
  torch AdamW / SGD (backprop reference): only where ONNX Runtime cannot build the gradient graph; the model's own
      torch code (benchmarks/ort_cases.py), the same tensors. Labelled as such.
Every side gets a learning-rate grid of the same size (3); the best run by its best accuracy is the side's row.
Seconds are the training loop's (process start-up, model loading and evaluations excluded, on both sides); the
rise is the peak RSS over the process's size after its imports (ORT's Python API imports torch). Before timing,
both sides are checked to train the same tensors (names and sizes) of the same file and to give the same loss
on the first batch; the check is in the JSON.

Time-to-accuracy: the target is 90% of ORT AdamW's best accuracy gain; CoCD's loop seconds to reach it over
ORT AdamW's. Memory: edgezo CoCD's peak RSS over ORT AdamW's.

    make bench-ort   (or: python benchmarks/ort_training.py --ort-python .venv-ort/bin/python [--cases demo ...])
        -> benchmarks/results/ort_training.json, runs/ort/ (cases, logs, per-run results)
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from common import write_json  # noqa: E402
from ort_cases import CASES  # noqa: E402

GRIDS = {"ORT AdamW": ("0.001", "0.003", "0.01"), "ORT SGD": ("0.01", "0.03", "0.1"),
         "edgezo CoCD": ("0.01", "0.03", "0.1"), "edgezo MeZO": ("0.003", "0.01", "0.03")}
# the engine's cap as in edgezo's own demo: its default (256) trades memory for speed on deep selections
CAP = ["--engine-memory-mb", "64"]
ZO_FLAGS = {"edgezo CoCD": ["--optimizer", "cocd", "--eps", "0.05", "--gamma", "0.95", "--budget", "64", *CAP],
            "edgezo MeZO": ["--optimizer", "mezo", "--mu", "0.01", "--directions", "64", *CAP]}
EPOCHS = {"demo": (20, 100), "mnv3_head": (40, 1000), "mnv3_bn_biases": (10, 40), "transformer_block": (10, 40)}


def run_quiet(cmd, log):
    with open(log, "w") as out:
        return subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT).returncode


def batch_order(rows, batch, epochs):
    """(steps, batch) row indices: edgezo train's epoch order (data.epoch_order, seed 0), written for ORT."""
    from edgezo.runtime.data import epoch_order
    assert rows % batch == 0, "whole batches only: both sides take the same steps"
    return np.concatenate([epoch_order(rows, 0, e).reshape(-1, batch) for e in range(epochs)])


def ort_job(case_dir, optimizer, **extra):
    manifest = json.loads((case_dir / "art" / "manifest.json").read_text())
    data = {k: str(case_dir / f"{k}.npy") for k in ("x", "y", "test_x", "test_y", "order")}
    return {"source": str(case_dir / "source.onnx"), "trainable": [e["name"] for e in manifest["trainable"]],
            "loss": manifest["loss"]["kind"], "optimizer": optimizer, "dir": str(case_dir / f"ort_{optimizer}"),
            "output": manifest["outputs"][0]["name"], "data": data, "eval_batch": CASES[case_dir.name][3], **extra}


def ort(python, mode, job, case_dir, tag):
    (case_dir / f"{tag}.job.json").write_text(json.dumps(job))
    out = case_dir / f"{tag}.json"
    code = run_quiet([python, HERE / "ort_worker.py", mode, case_dir / f"{tag}.job.json", out], case_dir / f"{tag}.log")
    if code:
        tail = (case_dir / f"{tag}.log").read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"ort_worker {mode} failed ({case_dir / tag}.log): {tail}")
    return json.loads(out.read_text())


def same_tensors_check(python, case_dir):
    """Both sides train the same tensors of the same file: names, sizes and the first batch's loss."""
    from edgezo.runtime import load_artifact
    art = load_artifact(case_dir / "art", "cpu", engine="naive")
    rows = np.load(case_dir / "order.npy")[0]
    x, y = np.load(case_dir / "x.npy")[rows], np.load(case_dir / "y.npy")[rows]
    loss, _ = art.outputs(art.initial_params(), {art.input_names[0]: x}, {art.target_names[0]: y})
    edgezo = {e["name"]: e["size"] for e in art.manifest["trainable"]}
    theirs = ort(python, "check", ort_job(case_dir, "adamw"), case_dir, "check")
    rel = abs(theirs["first_batch_loss"] - float(loss)) / abs(float(loss))
    return {"names_equal": sorted(edgezo) == sorted(theirs["trainable"]), "sizes_equal": edgezo == theirs["trainable"],
            "trainable_tensors": len(edgezo), "trainable_values": sum(edgezo.values()),
            "edgezo_first_batch_loss": float(loss), "ort_first_batch_loss": theirs["first_batch_loss"],
            "relative_difference": rel, "passed": edgezo == theirs["trainable"] and rel < 1e-4}


def diverged(log):
    """Whether the edgezo run that wrote `log` stopped on divergence (it then writes no metrics)."""
    return log.exists() and "training diverged" in (log.read_text().strip().splitlines() or [""])[-1]


def edgezo_run(case_dir, name, lr, epochs, batch, max_seconds, tag=""):
    run = case_dir / f"run_{name.split()[-1].lower()}_{lr}{tag}"
    log = Path(f"{run}.log")
    if not (run / "metrics.json").exists() and not diverged(log):
        cmd = [sys.executable, "-m", "edgezo.cli", "train", case_dir / "art", "--data", case_dir / "train.npz",
               "--val-data", case_dir / "test.npz", "--batch-size", batch, "--epochs", epochs, "--eval-every",
               max(1, CASES[case_dir.name][2] // batch), "--lr", lr, "--max-seconds", max_seconds, *ZO_FLAGS[name],
               "--out", run]
        if run_quiet(cmd, log) and not diverged(log):
            raise RuntimeError(f"edgezo train failed: see {log}")
    if diverged(log):  # the guard stopped it (10 rollbacks in a row): a grid point that lost
        lines = log.read_text().splitlines()
        seen = [float(a) / 100 for line in lines for a in re.findall(r"val acc ([0-9.]+)%", line)]
        return {"diverged": lines[-1], "evals": [], "best_before_divergence": max(seen, default=None)}
    m = json.loads((run / "metrics.json").read_text())
    evals = [{"step": e["step"], "seconds": e["seconds"], "loss": e["val_loss"], "accuracy": e["val_accuracy"]}
             for e in m["evals"]]
    return {"evals": evals, "peak_rss_mb": m["peak_rss_mb"], "rss_baseline_mb": m["rss_baseline_mb"],
            "rss_rise_mb": m["rss_rise_mb"], "torch_imported": m["torch_imported"], "engine": m["engine"]}


def backprop_run(python, case_dir, side, lr, max_seconds, every, batch=None, epochs=None):
    """ORT (own venv) or, where ORT cannot build gradients, the torch reference: same loop, same JSON.
    batch/epochs: another batch size than the case's (its own batch order file)."""
    optimizer = "adamw" if "AdamW" in side else "sgd"
    tag = f"run_{side.split()[0].lower()}_{optimizer}_{lr}" + (f"_b{batch}_{max_seconds:g}s" if batch else "")
    if (case_dir / f"{tag}.json").exists():
        return json.loads((case_dir / f"{tag}.json").read_text())
    job = ort_job(case_dir, optimizer, lr=float(lr), max_seconds=max_seconds, eval_every=every)
    if batch:
        np.save(case_dir / f"order_b{batch}.npy", batch_order(CASES[case_dir.name][2], batch, epochs))
        job.update(eval_batch=batch, data=dict(job["data"], order=str(case_dir / f"order_b{batch}.npy")))
    if side.startswith("ORT"):
        return ort(python, "train", job, case_dir, tag)
    job.update(arch=CASES[case_dir.name][0], model=str(case_dir / "model.pt"))
    (case_dir / f"{tag}.job.json").write_text(json.dumps(job))
    if run_quiet([sys.executable, HERE / "ort_cases.py", "torch", case_dir / f"{tag}.job.json", case_dir / f"{tag}.json"],
                 case_dir / f"{tag}.log"):
        raise RuntimeError(f"torch reference failed: see {case_dir / tag}.log")
    return json.loads((case_dir / f"{tag}.json").read_text())


def best_of(grid):
    """The grid point with the best accuracy; one that diverged (no metrics) counts as lost, "diverged" in grid."""
    def best(v):
        return max((e["accuracy"] for e in v["evals"]), default=-1.0)
    lr = max(grid, key=lambda k: best(grid[k]))
    if not grid[lr]["evals"]:
        raise RuntimeError(f"every grid point diverged: {grid[lr]['diverged']}")
    return dict(grid[lr], lr=lr, best_accuracy=best(grid[lr]),
                grid={k: best(v) if v["evals"] else f"diverged ({v['diverged']})" for k, v in grid.items()})


def reach(row, target):
    """(steps, seconds) of the first evaluation at or above target, else None."""
    return next(((e["step"], e["seconds"]) for e in row["evals"] if e["accuracy"] >= target), None)


def ratios(rows, reference):
    ref, cocd = rows[reference], rows["edgezo CoCD"]
    before = ref["evals"][0]["accuracy"]
    target = before + 0.9 * (ref["best_accuracy"] - before)
    theirs, ours = reach(ref, target), reach(cocd, target)
    out = {"reference": reference, "accuracy_before": before, "target_accuracy": target,
           "reference_steps_to_target": theirs[0], "reference_seconds_to_target": theirs[1],
           "peak_rss_ratio": cocd["peak_rss_mb"] / ref["peak_rss_mb"], "rise_ratio": cocd["rss_rise_mb"] /
           max(ref["rss_rise_mb"], 1e-9)}
    if ours:
        out.update(cocd_steps_to_target=ours[0], cocd_seconds_to_target=ours[1],
                   time_to_accuracy_ratio=ours[1] / max(theirs[1], 1e-9), steps_ratio=ours[0] / max(theirs[0], 1),
                   step_time_ratio=(ours[1] / max(ours[0], 1)) / max(theirs[1] / max(theirs[0], 1), 1e-9))
    else:
        out["cocd_not_reached_in_seconds"] = cocd["evals"][-1]["seconds"]
    return out


def run_case(name, python, work, max_seconds):
    case_dir = work / name
    arch, _, rows, batch = CASES[name]
    if not (case_dir / "art" / "manifest.json").exists():
        print(f"[{name}] building (pretraining with torch, export)...", flush=True)
        subprocess.run([sys.executable, HERE / "ort_cases.py", "build", name, case_dir], check=True)
    backprop_epochs, zo_epochs = EPOCHS[name]
    np.save(case_dir / "order.npy", batch_order(rows, batch, backprop_epochs))  # forward-only: edgezo's own order
    result = {"architecture": arch, "train_rows": rows, "batch": batch, "epochs": {"backprop": backprop_epochs,
              "forward_only": zo_epochs}, "max_seconds": max_seconds, "errors": {}}
    result["artifacts"] = {o: ort(python, "artifacts", ort_job(case_dir, o), case_dir, f"artifacts_{o}")
                           for o in ("adamw", "sgd")}
    ort_ok = result["artifacts"]["adamw"]["ok"]
    if ort_ok:
        result["check"] = same_tensors_check(python, case_dir)
        print(f"[{name}] same tensors, same file: {result['check']}", flush=True)
        if not result["check"]["passed"]:
            raise SystemExit(f"[{name}] the two sides do not train the same thing: {result['check']}")
    else:
        result["errors"]["ORT"] = result["artifacts"]["adamw"]["error"]
        print(f"[{name}] ONNX Runtime training cannot build this case: {result['errors']['ORT']}", flush=True)
    sides = ["ORT AdamW", "ORT SGD"] if ort_ok else ["torch AdamW (backprop reference)", "torch SGD (backprop reference)"]
    every = rows // batch
    runs = {side: (lambda lr, side=side: backprop_run(python, case_dir, side, lr, max_seconds, every),
                   GRIDS["ORT AdamW" if "AdamW" in side else "ORT SGD"]) for side in sides}
    runs.update({side: (lambda lr, side=side: edgezo_run(case_dir, side, lr, zo_epochs, batch, max_seconds),
                        GRIDS[side]) for side in ZO_FLAGS})
    rows_out = {}
    for side, (run, grid) in runs.items():
        row = rows_out[side] = best_of({lr: run(lr) for lr in grid})
        print(f"[{name}] {side}: {100 * row['best_accuracy']:.1f}% (lr {row['lr']}), peak {row['peak_rss_mb']:.0f} "
              f"MiB, rise {row['rss_rise_mb']:.0f}", flush=True)
    result["rows"] = rows_out
    result["ratios"] = ratios(rows_out, sides[0])
    print(f"[{name}] {json.dumps(result['ratios'])}", flush=True)
    return result


def long_runs(case, case_dir, max_seconds):
    """The forward-only sides at their grid's best lr once more, capped at max_seconds instead of the grid's cap,
    where CoCD did not reach the target within the grid's cap: when (steps, loop seconds) each reaches it, if it
    does. Recorded beside the grid's ratios, not in place of them."""
    r = case["ratios"]
    out = {"max_seconds": max_seconds, "target_accuracy": r["target_accuracy"]}
    for side in ZO_FLAGS:
        row = case["rows"][side]
        run = edgezo_run(case_dir, side, row["lr"], 1000, case["batch"], max_seconds, tag=f"_{max_seconds:g}s")
        if "diverged" in run:  # the guard stopped it: no metrics.json, the log's epoch lines only
            out[side] = {"lr": row["lr"], "diverged": run["diverged"], "best_accuracy": run["best_before_divergence"]}
            print(f"[{case_dir.name}] {side} at lr {row['lr']}, {max_seconds:g} s: {run['diverged']} (best before: "
                  f"{100 * (run['best_before_divergence'] or 0):.1f}%)", flush=True)
            continue
        got = reach(run, r["target_accuracy"])
        out[side] = {"lr": row["lr"], "best_accuracy": max(e["accuracy"] for e in run["evals"]),
                     "rss_rise_mb": run["rss_rise_mb"], "peak_rss_mb": run["peak_rss_mb"],
                     "last": run["evals"][-1]}
        if got:
            out[side].update(steps_to_target=got[0], seconds_to_target=got[1],
                             time_to_accuracy_ratio=got[1] / max(r["reference_seconds_to_target"], 1e-9))
        print(f"[{case_dir.name}] {side} at lr {row['lr']}, {max_seconds:g} s: best {100 * out[side]['best_accuracy']:.1f}%"
              + (f", target reached at step {got[0]}, {got[1]:.0f} s" if got else ", target not reached"), flush=True)
    return out


BUDGET_MB, BUDGET_BATCHES = 256, (32, 64, 128, 256, 512, 1024)


def memory_budget(python, work, rows, max_seconds, probe_seconds=10):
    """Case mnv3_bn_biases at growing batch sizes: the largest batch each side (edgezo CoCD, MeZO and the case's backprop
    reference, each at its grid's best lr) fits under BUDGET_MB of rise (a short run per batch), then the accuracy
    it reaches at that batch within max_seconds of training loop."""
    case_dir = work / "mnv3_bn_biases"
    rows_n = CASES["mnv3_bn_biases"][2]
    out = {"budget_mb": BUDGET_MB, "probe_seconds": probe_seconds, "max_seconds": max_seconds}
    for side, row in rows.items():
        if not side.startswith("edgezo") and "AdamW" not in side:
            continue

        def run(batch, seconds):
            if side.startswith("edgezo"):
                return edgezo_run(case_dir, side, row["lr"], 1000, batch, seconds, tag=f"_b{batch}_{seconds:g}s")
            return backprop_run(python, case_dir, side, row["lr"], seconds, max(1, rows_n // batch), batch,
                                epochs=int(seconds * 100 * 32 / rows_n) + 1)  # ~100 steps/s at batch 32
        rises = {}
        for batch in BUDGET_BATCHES:
            rises[batch] = run(batch, probe_seconds)["rss_rise_mb"]
            print(f"[budget] {side} batch {batch}: rise {rises[batch]:.0f} MiB", flush=True)
            if rises[batch] > BUDGET_MB:
                break
        fitting = [b for b, r in rises.items() if r <= BUDGET_MB]
        entry = {"lr": row["lr"], "rise_by_batch": rises, "largest_batch": max(fitting) if fitting else None}
        if fitting:
            final = run(max(fitting), max_seconds)
            entry.update(accuracy=max(e["accuracy"] for e in final["evals"]), rss_rise_mb=final["rss_rise_mb"],
                         seconds=final["evals"][-1]["seconds"], steps=final["evals"][-1]["step"],
                         # a short probe misses what a long run accumulates (CoCD's sessions over a cycle)
                         within_budget=final["rss_rise_mb"] <= BUDGET_MB)
            print(f"[budget] {side}: batch {entry['largest_batch']}, {100 * entry['accuracy']:.1f}% in "
                  f"{entry['seconds']:.0f} s", flush=True)
        out[side] = entry
    return out


def markdown(results):
    """The per-case table of docs/results.md."""
    lines = ["| case | backprop reference (best lr) | its best | CoCD best | MeZO best | to 90% of its gain: reference "
             "/ CoCD (steps, loop s) | time ratio | steps ratio, step-time ratio | peak RSS ref / CoCD (ratio) | "
             "rise ref / CoCD (ratio) |", "|" + "---|" * 10]
    for name, case in results["cases"].items():
        r, rows = case["ratios"], case["rows"]
        ref, cocd, mezo = rows[r["reference"]], rows["edgezo CoCD"], rows["edgezo MeZO"]
        if "cocd_seconds_to_target" in r:
            ours = f"{r['cocd_steps_to_target']}, {r['cocd_seconds_to_target']:.1f} s"
            ratio = f"**{r['time_to_accuracy_ratio']:.2f}x**"
            why = f"{r['steps_ratio']:.1f}x, {r['step_time_ratio']:.2f}x"
        else:
            ours, ratio, why = f"not reached in {r['cocd_not_reached_in_seconds']:.0f} s", "-", "-"
        label = r["reference"] + (" (ORT cannot build it)" if case["errors"].get("ORT") else "")
        lines.append(
            f"| {name} | {label} ({ref['lr']}) | {100 * ref['best_accuracy']:.1f}% | {100 * cocd['best_accuracy']:.1f}% "
            f"({cocd['lr']}) | {100 * mezo['best_accuracy']:.1f}% ({mezo['lr']}) | {r['reference_steps_to_target']}, "
            f"{r['reference_seconds_to_target']:.1f} s / {ours} | {ratio} | {why} | {ref['peak_rss_mb']:.0f} / "
            f"{cocd['peak_rss_mb']:.0f} MiB ({r['peak_rss_ratio']:.2f}) | {ref['rss_rise_mb']:.0f} / "
            f"{cocd['rss_rise_mb']:.0f} MiB ({r['rise_ratio']:.2f}) |")
    for name, case in results["cases"].items():
        long = case.get("long_runs")
        if long:
            said = [f"{side} (lr {v['lr']}) best {100 * v['best_accuracy']:.1f}%, " + (
                f"then {v['diverged'].removeprefix('edgezo: error: ')}" if "diverged" in v else
                (f"target at step {v['steps_to_target']}, {v['seconds_to_target']:.0f} s "
                 f"({v['time_to_accuracy_ratio']:.1f}x)" if "seconds_to_target" in v else "target not reached")
                + f", rise {v['rss_rise_mb']:.0f} MiB") for side, v in long.items() if isinstance(v, dict)]
            lines.append(f"\n{name}, forward-only re-run at its best lr capped at {long['max_seconds']:.0f} s: "
                         + "; ".join(said) + ".")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ort-python", default=str(ROOT / ".venv-ort" / "bin" / "python"),
                   help="python of the venv with onnxruntime-training 1.19.2 (make bench-ort builds it)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--out", default=str(ROOT / "runs" / "ort"))
    p.add_argument("--table", action="store_true", help="print the markdown table of the last results and exit")
    p.add_argument("--max-seconds", type=float, default=600, help="cap on each run's training loop")
    p.add_argument("--budget-seconds", type=float, default=0,
                   help="with mnv3_bn_biases: also the largest batch each side fits under 256 MiB of rise and its "
                        "accuracy within this many seconds (0: skip)")
    p.add_argument("--long-seconds", type=float, default=0,
                   help="where CoCD misses the target within --max-seconds: CoCD and MeZO at their best lr once more, "
                        "capped at this many seconds (0: skip)")
    args = p.parse_args()
    if args.table:
        print(markdown(json.loads((ROOT / "benchmarks" / "results" / "ort_training.json").read_text())))
        return
    if not Path(args.ort_python).exists():
        raise SystemExit(f"{args.ort_python} not found: run `make bench-ort` (it builds .venv-ort)")
    work = Path(args.out).resolve()
    start = time.perf_counter()
    saved = ROOT / "benchmarks" / "results" / "ort_training.json"  # cases not run keep their last results
    results = json.loads(saved.read_text()) if saved.exists() else {"cases": {}}
    results.update({"grids": GRIDS, "forward_only_flags": ZO_FLAGS, "eval_batch": "the training batch, both sides"})
    for name in args.cases:
        results["cases"][name] = case = dict(run_case(name, args.ort_python, work, args.max_seconds),
                                             measured=time.strftime("%Y-%m-%d"))
        if args.long_seconds and "cocd_not_reached_in_seconds" in case["ratios"]:
            case["long_runs"] = long_runs(case, work / name, args.long_seconds)
    if args.budget_seconds and "mnv3_bn_biases" in results["cases"]:
        results["memory_budget"] = memory_budget(args.ort_python, work, results["cases"]["mnv3_bn_biases"]["rows"],
                                                 args.budget_seconds)
    results["seconds"] = time.perf_counter() - start
    write_json("ort_training", results)
    print(markdown(results))


if __name__ == "__main__":
    main()
