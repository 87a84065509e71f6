"""The run folder: train, checkpoint, resume, metrics and write-back, for the CLI and Python users alike.

    from edgezo.runtime import run
    metrics = run.train("artifact/", "data.npz", "runs/a", epochs=3, lr=0.05, budget=32)
    metrics = run.resume("runs/a")                      # after an interruption (needs checkpoint_every)
    run.write_back("runs/a", "adapted.onnx")            # the deployed model with the trained values

Settings are the fields of config.RunConfig (keywords, or `config=`). A run reads as prepare (load and check
everything, write nothing) / restore (a checkpoint, or a new folder with config.json) / fit (the loop, with
checkpoints) / finish (params.npy, trained.onnx, metrics.json, each atomic). No torch.
"""
import json
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .config import PATHS, RunConfig
from .errors import EdgezoError, check
from .files import check_new_folder

RUN_CONFIG = "config.json"


def parse_memory(value, n):
    """memory: a count (an integer) or a fraction of n in (0, 1] (a float, or a number with a point)."""
    if isinstance(value, float):
        value = repr(value)
    try:
        count = int(value)
    except ValueError:
        try:
            fraction = float(value)
        except ValueError:
            raise EdgezoError(f"--memory must be a count or a fraction in (0, 1], got {value!r}") from None
        check(0 < fraction <= 1, f"--memory fraction must be in (0, 1], got {value}")
        return max(1, int(round(fraction * n)))
    check(1 <= count <= n, f"--memory must be in [1, n={n}], got {count}")
    return count


def make_optimizer(config, params):
    """The optimizer a config names, with the hyperparameters it takes (config.TAKES)."""
    from . import optim
    h = config.hyper()
    directional = {"spsa": optim.SPSA, "zosgd": optim.ZOSGD, "mezo": optim.MeZOSGD}
    if config.optimizer in directional:
        return directional[config.optimizer](params, lr=h["lr"], mu=h["mu"], directions=h["directions"],
                                             seed=config.seed, weight_decay=h["weight_decay"])
    if config.optimizer == "cge":
        return optim.CGE(params, lr=h["lr"], mu=h["mu"], budget=h["budget"], weight_decay=h["weight_decay"])
    memory = None if h["memory"] is None else parse_memory(h["memory"], params.size)
    gamma = 0.0 if config.optimizer == "bccd" else h["gamma"]
    return optim.CoCD(params, lr=h["lr"], eps=h["eps"], budget=h["budget"], memory=memory, gamma=gamma,
                      weight_decay=h["weight_decay"], central=not h["one_sided"])


def optimizer_settings(opt):
    return {"type": type(opt).__name__, **opt.state_dict()["settings"]}


def load_train_val(config, manifest):
    """(train, validation or None) from a config's data, val_data, val_fraction, target_columns and seed."""
    from . import data
    train = data.load_data(config.data, manifest, config.target_columns)
    if config.val_data:
        return train, data.load_data(config.val_data, manifest, config.target_columns)
    if config.val_fraction:
        return data.split(train, config.val_fraction, config.seed)
    return train, None


@dataclass
class Run:
    """What a run holds while it trains."""
    config: RunConfig
    artifact: object
    params: np.ndarray
    optimizer: object
    guard: object
    train: dict
    val: object
    baseline_mb: float
    resumed: bool = False
    position: tuple = (0, 0)
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)


def prepare(config, log, resumed=False):
    """Everything loaded and checked (artifact, optimizer, data); nothing written."""
    from . import load_artifact
    from .data import check_batch_size, num_rows
    from .memory import import_runtime, rss_mb
    from .train import DivergenceGuard
    import_runtime(config.engine)
    baseline = rss_mb()
    config.check()
    artifact = load_artifact(config.artifact, device=config.device, threads=config.threads, backend=config.backend,
                             engine=config.engine, engine_memory_mb=config.engine_memory_mb,
                             lean_memory=config.lean_memory)
    artifact.race = True
    params = artifact.initial_params()
    opt = make_optimizer(config, params)
    guard = DivergenceGuard(config.divergence_factor, config.on_divergence, log=log)
    artifact.fast_engine()  # before the data: making sessions peaks higher than what they keep (13 vs 8 MiB on
    # a MobileNetV3 head), and that transient would stack on the data's memory
    train, val = load_train_val(config, artifact.manifest)
    check_batch_size(config.batch_size, num_rows(train))
    return Run(config, artifact, params, opt, guard, train, val, baseline, resumed)


def restore(run, log):
    """A resumed run: params, optimizer and position from its checkpoint. A new one: its folder and config.json."""
    from . import checkpoint
    from .files import save_json
    out = Path(run.config.out)
    if run.resumed:
        saved_params, state, info = checkpoint.load(out)
        check(saved_params.shape == run.params.shape and info["fingerprint"] == run.config.fingerprint,
              f"--resume {out}: {checkpoint.NAME} does not belong to this run's artifact")
        run.params[:] = saved_params
        run.optimizer.load_state_dict(state)
        run.position, run.history = tuple(info["position"]), info["history"]
        run.evals = info.get("evals", [])
        log(f"resuming at epoch {run.position[0] + 1}, batch {run.position[1]} (step {run.optimizer.steps})")
        return
    run.config.fingerprint = checkpoint.fingerprint(run.config.artifact)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / RUN_CONFIG, run.config.to_json())


def fit_run(run, log, on_eval=None):
    """The epochs (or config.steps batches), with a checkpoint every config.checkpoint_every steps and a validation
    loss every config.eval_every batches (each also passed to on_eval); returns the training loop's seconds."""
    from . import checkpoint
    from .data import batches_per_epoch, num_rows
    from .train import fit
    config, opt, out = run.config, run.optimizer, Path(run.config.out)
    per_epoch = batches_per_epoch(num_rows(run.train), config.batch_size,
                                  drop_last=run.artifact.fixed_batch is not None)
    epochs = -(-config.steps // per_epoch) if config.steps else config.epochs

    def on_step(epoch, b, result):
        if config.checkpoint_every and opt.steps % config.checkpoint_every == 0 and not result.diverged:
            nxt = (epoch, b + 1) if b + 1 < per_epoch else (epoch + 1, 0)
            checkpoint.save(out, run.params, opt.state_dict(),
                            {"position": nxt, "history": run.history, "evals": run.evals,
                             "fingerprint": config.fingerprint})

    def record_eval(record):
        run.evals.append(record)
        if on_eval:
            on_eval(record)

    settings = ", ".join(f"{k}={v}" for k, v in optimizer_settings(opt).items() if k != "type")
    log(f"training {run.artifact.num_params} params on {num_rows(run.train)} rows with {config.optimizer} "
        f"({settings}) on {run.artifact.device} via {run.artifact.backend}")
    run.artifact.fast_engine()
    if run.artifact.engine_note:
        log(run.artifact.engine_note)
    start = time.perf_counter()
    fit(run.artifact, opt, run.train, config.batch_size, epochs, seed=config.seed, val_data=run.val,
        log=log, start_epoch=run.position[0], start_batch=run.position[1], on_step=on_step,
        on_epoch=run.history.append, guard=run.guard, max_steps=config.steps, eval_every=config.eval_every,
        on_eval=record_eval, max_seconds=config.max_seconds)
    return time.perf_counter() - start


def finish(run, seconds, log):
    artifact, opt = run.artifact, run.optimizer
    metrics = {"optimizer": run.config.optimizer, "settings": optimizer_settings(opt), "steps": opt.steps,
               "device": artifact.device, "seconds": seconds, "history": run.history,
               "divergence_events": run.guard.events, "resumed": run.resumed, "backend": artifact.backend,
               "engine": "naive" if artifact.fast_engine() is None else artifact.engine_name,
               "engine_paths": artifact.tensor_paths() if artifact.backend == "onnxruntime" else {},
               "rss_baseline_mb": run.baseline_mb, "engine_note": artifact.engine_note}
    if run.evals:
        metrics["evals"] = run.evals
    if artifact.backend == "onnxruntime":
        metrics["paths_taken"] = artifact.paths_taken()
    c = run.config
    return write_run(c.out, c.artifact, c.batch_size, len(run.history), c.seed, artifact.file("inference"),
                     artifact.manifest, run.params, metrics, log)


def execute(config, log=print, resumed=False, on_eval=None):
    """prepare / restore / fit / finish; returns metrics.json's content. on_eval(record) sees each validation
    (config.eval_every) as it is made."""
    run = prepare(config, log, resumed)
    restore(run, log)
    return finish(run, fit_run(run, log, on_eval), log)


def write_run(out, artifact, batch_size, epochs, seed, inference_path, manifest, params, metrics, log=print):
    """params.npy, trained.onnx and metrics.json into the run folder, each written atomically."""
    from .files import save_json, save_npy
    from .memory import peak_rss_mb
    from .writeback import write_back
    out = Path(out)
    metrics = {"artifact": str(Path(artifact).resolve()), **metrics, "batch_size": batch_size,
               "epochs": epochs, "seed": seed, "peak_rss_mb": peak_rss_mb(),
               "torch_imported": sys.modules.get("torch") is not None}
    if "rss_baseline_mb" in metrics:  # the rise over the process's size after its imports
        metrics["rss_rise_mb"] = metrics["peak_rss_mb"] - metrics["rss_baseline_mb"]
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / "params.npy", params)
    write_back(inference_path, manifest["trainable"], params, out / "trained.onnx",
               {"optimizer": metrics["optimizer"], "settings": metrics.get("settings", {}), "steps": metrics["steps"]},
               lora=manifest.get("lora", ()), quantized=manifest.get("quantized"))
    save_json(out / "metrics.json", metrics)
    log(f"wrote {out}/params.npy, trained.onnx, metrics.json")
    return metrics


def train(artifact=None, data=None, out=None, config=None, log=print, on_eval=None, **settings):
    """Train `artifact` on `data` into the new run folder `out`. Settings: a RunConfig (`config=`) and/or its
    fields as keywords (optimizer, lr, eps, budget, memory, gamma, weight_decay, batch_size, epochs, val_data,
    checkpoint_every, engine, ...). Returns metrics.json's content."""
    names = {f.name for f in fields(RunConfig)} - {"fingerprint"}
    unknown = sorted(set(settings) - names)
    check(not unknown, f"unknown training setting {unknown[0] if unknown else ''!r}; see runtime.config.RunConfig")
    given = {k: str(v) for k, v in dict(artifact=artifact, data=data, out=out).items() if v is not None}
    config = replace(config or RunConfig(), **given, **settings)
    check(config.artifact is not None and config.data is not None and config.out is not None,
          "train needs ARTIFACT, --data and --out (or --resume RUN_DIR)")
    check_new_folder(config.out)
    config = replace(config, **{k: str(Path(getattr(config, k)).resolve()) for k in PATHS if getattr(config, k)})
    return execute(config, log, on_eval=on_eval)


def resume(run_dir, artifact=None, log=print):
    """Continue the run in `run_dir` from its checkpoint, bit-identically; returns metrics.json's content."""
    run_dir = Path(run_dir)
    check(run_dir.is_dir(), f"--resume {run_dir}: not a run folder")
    try:
        saved = json.loads((run_dir / RUN_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgezoError(f"--resume {run_dir}: cannot read {RUN_CONFIG} ({type(e).__name__})") from None
    check((run_dir / "metrics.json").exists() is False, f"--resume {run_dir}: this run already finished")
    if artifact is not None:
        from .checkpoint import fingerprint
        check(fingerprint(artifact) == saved["fingerprint"],
              f"--resume {run_dir}: its checkpoint belongs to another artifact than {artifact}")
    return execute(replace(RunConfig.from_json(saved), out=str(run_dir)), log, resumed=True)


def write_back(run_dir, out, artifact=None):
    """The run's artifact's inference model with the run's trained params.npy, written to `out`."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    check(metrics_path.exists(), f"{run_dir}: no metrics.json (the run has not finished)")
    artifact = artifact or json.loads(metrics_path.read_text())["artifact"]
    return write_back_params(artifact, run_dir / "params.npy", out)


def write_back_params(artifact, params_path, out, label="params "):
    """The artifact's inference model with the flat vector in params_path written in, to `out`; the training
    metadata comes from a metrics.json beside params_path where there is one."""
    from .files import load_params
    from .manifest import read
    from .writeback import write_back as write
    artifact = Path(artifact)
    manifest = read(artifact / "manifest.json")
    params = load_params(params_path, manifest["num_params"], label)
    metrics_path = Path(params_path).with_name("metrics.json")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    meta = {k: metrics[k] for k in ("optimizer", "settings", "steps") if k in metrics}
    return write(artifact / manifest["files"]["inference"], manifest["trainable"], params, out, meta,
                 lora=manifest.get("lora", ()), quantized=manifest.get("quantized"))
