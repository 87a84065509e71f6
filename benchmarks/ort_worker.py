"""ONNX Runtime's on-device training, as a user would run it: run by benchmarks/ort_training.py with the python of
.venv-ort (`make bench-ort`), never with the project's (onnxruntime-training replaces onnxruntime). Imports nothing
of edgezo; everything comes and goes as files: a job .json in, a result .json out.

  artifacts JOB: the offline step (generate_artifacts: training, eval and optimizer graphs, checkpoint) for the job's
                 source ONNX file, trainable tensor names, loss and optimizer; its error, in one line, if it fails.
  check JOB:     trainable names and sizes in the checkpoint, and the eval graph's loss on the first batch.
  train JOB:     the training loop over the job's batch order; accuracy every eval_every steps (evaluation time
                 excluded from "seconds"), peak RSS and its rise over the size after the imports.
"""
import json
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def artifacts(job):
    import onnx
    from onnxruntime.training import artifacts as ort_artifacts
    model = onnx.load(job["source"])
    names = set(job["trainable"])
    frozen = [t.name for t in model.graph.initializer if t.name not in names]
    loss = {"cross_entropy": ort_artifacts.LossType.CrossEntropyLoss, "mse": ort_artifacts.LossType.MSELoss}
    optim = {"adamw": ort_artifacts.OptimType.AdamW, "sgd": ort_artifacts.OptimType.SGD}
    out = Path(job["dir"])
    out.mkdir(parents=True, exist_ok=True)
    try:
        ort_artifacts.generate_artifacts(model, requires_grad=sorted(names), frozen_params=frozen,
                                         loss=loss[job["loss"]], optimizer=optim[job["optimizer"]],
                                         artifact_directory=str(out), additional_output_names=[job["output"]])
        return {"ok": True}
    except Exception as e:  # the incumbent's own failure is this case's row: its message without the C++ signature
        first = str(e).strip().splitlines()[0]
        where = re.match(r"(\S+\.(?:cc|h):\d+)", first)
        said = re.search(r"\) (?:const )?((?=[A-Za-z]).*)$", first)
        return {"ok": False, "error": f"{type(e).__name__} at {where.group(1) if where else '?'}: "
                                      f"{(said.group(1) if said else first)[:300]}", "full_error": first[:2000]}


def load(job, threads=2):
    import onnxruntime as ort
    from onnxruntime.training.api import CheckpointState, Module, Optimizer
    d = Path(job["dir"])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    state = CheckpointState.load_checkpoint(str(d / "checkpoint"))
    module = Module(str(d / "training_model.onnx"), state, str(d / "eval_model.onnx"), device="cpu",
                    session_options=options)
    return state, module, Optimizer(str(d / "optimizer_model.onnx"), module)


def data(job):
    arrays = {k: np.load(v, mmap_mode="r" if k == "order" else None)  # x, y, test_x, test_y, order (steps x batch)
              for k, v in job["data"].items()}
    if job["loss"] == "cross_entropy":
        arrays["y"], arrays["test_y"] = arrays["y"].astype(np.int64), arrays["test_y"].astype(np.int64)
    return arrays


def evaluate(module, x, y, batch, classify):
    module.eval()
    total, correct = 0.0, 0
    for i in range(0, len(x), batch):
        loss, out = module(x[i:i + batch], y[i:i + batch])
        total += float(loss) * len(out)
        if classify:
            correct += int(np.sum(out.argmax(-1) == y[i:i + batch]))
    module.train()
    return {"loss": total / len(x), **({"accuracy": correct / len(x)} if classify else {})}


def timed_loop(order, step, evaluate, every, max_seconds):
    """step(rows) per row of `order`; evaluate() at step 0, every `every` steps and at the end, each record with
    the loop's seconds so far (evaluations excluded). Stops past max_seconds or at a non-finite loss."""
    evals, start, evaluating = [], time.perf_counter(), 0.0
    for i in range(len(order) + 1):
        if i % every == 0 or i == len(order):
            t = time.perf_counter()
            evals.append({"step": i, "seconds": t - start - evaluating, **evaluate()})
            evaluating += time.perf_counter() - t
            if not np.isfinite(evals[-1]["loss"]) or t - start - evaluating > max_seconds:
                break
        if i < len(order):
            step(np.array(order[i]))
    return evals


def check(job):
    state, module, _ = load(job)
    d = data(job)
    rows = d["order"][0]
    module.eval()
    loss, _ = module(d["x"][rows], d["y"][rows])
    return {"trainable": {n: int(p.data.size) for n, p in state.parameters if p.requires_grad},
            "first_batch_loss": float(loss)}


def train(job):
    baseline = rss_mb()  # onnxruntime.training and torch imported (module level)
    d = data(job)
    _, module, optimizer = load(job, job.get("threads", 2))
    optimizer.set_learning_rate(job["lr"])
    classify = job["loss"] == "cross_entropy"
    module.train()

    def step(rows):
        module(d["x"][rows], d["y"][rows])
        optimizer.step()
        module.lazy_reset_grad()
    evals = timed_loop(d["order"], step, lambda: evaluate(module, d["test_x"], d["test_y"], job["eval_batch"], classify),
                       job["eval_every"], job["max_seconds"])
    return {"evals": evals, "peak_rss_mb": peak_rss_mb(), "rss_baseline_mb": baseline,
            "rss_rise_mb": peak_rss_mb() - baseline, "torch_imported": "torch" in sys.modules}


if __name__ == "__main__":
    if sys.argv[1] != "artifacts":
        import onnxruntime.training.api  # noqa: F401  (imports torch: part of the baseline, as for a user)
    mode, job_path, out_path = sys.argv[1:4]
    result = {"artifacts": artifacts, "check": check, "train": train}[mode](json.loads(Path(job_path).read_text()))
    Path(out_path).write_text(json.dumps(result, indent=1))
