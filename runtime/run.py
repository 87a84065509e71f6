"""The run folder: train, checkpoint, resume, metrics and write-back, for the CLI and Python users alike.

    from edgezo.runtime import run
    metrics = run.train("artifact/", "data.npz", "runs/a", epochs=3, lr=0.05, budget=32)
    metrics = run.resume("runs/a")                      # after an interruption (needs --checkpoint-every)
    run.write_back("runs/a", "adapted.onnx")            # the deployed model with the trained values

A run folder holds config.json (every setting, paths absolute), checkpoint.npz (atomic, when
checkpoint_every is set), and at the end params.npy, trained.onnx and metrics.json. No torch.
"""
import json
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np

from .errors import EdgezoError, check
from .files import check_new_folder

OPTIMIZERS = ("cocd", "bccd", "spsa", "zosgd", "mezo", "cge")
RUN_CONFIG = "config.json"
PATH_ARGS = ("artifact", "data", "val_data")
DEFAULTS = {"optimizer": "cocd", "directions": 1, "mu": 1e-3, "lr": 1e-3, "eps": 1e-2, "budget": 64, "memory": None,
            "gamma": 1.0, "weight_decay": 0.0, "one_sided": False, "batch_size": 64, "epochs": 1, "seed": 0,
            "val_data": None, "val_fraction": None, "target_columns": None, "device": "auto",
            "checkpoint_every": None, "resume": None, "divergence_factor": 1e3, "on_divergence": "rollback",
            "backend": "onnxruntime", "engine": "auto", "engine_memory_mb": 256, "lean_memory": False, "threads": 2}


def parse_memory(text, n):
    """--memory: a count (an integer) or a fraction of n in (0, 1] (a number with a point)."""
    try:
        value = int(text)
    except ValueError:
        try:
            fraction = float(text)
        except ValueError:
            raise EdgezoError(f"--memory must be a count or a fraction in (0, 1], got {text!r}") from None
        check(0 < fraction <= 1, f"--memory fraction must be in (0, 1], got {text}")
        return max(1, int(round(fraction * n)))
    check(1 <= value <= n, f"--memory must be in [1, n={n}], got {value}")
    return value


def make_optimizer(args, params):
    from . import optim
    directional = {"spsa": optim.SPSA, "zosgd": optim.ZOSGD, "mezo": optim.MeZOSGD}
    if args.optimizer in directional:
        return directional[args.optimizer](params, lr=args.lr, mu=args.mu, directions=args.directions, seed=args.seed)
    if args.optimizer == "cge":
        return optim.CGE(params, lr=args.lr, mu=args.mu, budget=args.budget, weight_decay=args.weight_decay)
    memory = None if args.memory is None else parse_memory(args.memory, params.size)
    gamma = 0.0 if args.optimizer == "bccd" else args.gamma
    return optim.CoCD(params, lr=args.lr, eps=args.eps, budget=args.budget, memory=memory, gamma=gamma,
                      weight_decay=args.weight_decay, central=not args.one_sided)


def optimizer_settings(opt):
    state = opt.state_dict()
    return {k: v for k, v in state.items() if not isinstance(v, np.ndarray) and k not in ("steps", "refreshed", "rng")}


def load_train_val(args, manifest):
    from . import data
    train = data.load_data(args.data, manifest, args.target_columns)
    if args.val_data:
        return train, data.load_data(args.val_data, manifest, args.target_columns)
    if args.val_fraction:
        return data.split(train, args.val_fraction, args.seed)
    return train, None


RUN_CONFIG = "config.json"
PATH_ARGS = ("artifact", "data", "val_data")


def resume_args(args):
    """The saved arguments of the run folder given to --resume (paths absolute), with --resume kept."""
    run = Path(args.resume)
    check(run.is_dir(), f"--resume {run}: not a run folder")
    try:
        saved = json.loads((run / RUN_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgezoError(f"--resume {run}: cannot read {RUN_CONFIG} ({type(e).__name__})") from None
    check((run / "metrics.json").exists() is False, f"--resume {run}: this run already finished")
    if args.artifact is not None:
        from .checkpoint import fingerprint
        check(fingerprint(args.artifact) == saved["fingerprint"],
              f"--resume {run}: its checkpoint belongs to another artifact than {args.artifact}")
    return Namespace(**{**saved, "resume": str(run), "out": str(run)})


def _train(args, log=print):
    from . import checkpoint, load_artifact
    from .data import check_batch_size, num_rows
    from .files import save_json
    from .train import DivergenceGuard, fit
    from .memory import rss_mb
    baseline = rss_mb()
    if args.resume:
        args = resume_args(args)
    else:
        check(args.artifact is not None and args.data is not None and args.out is not None,
              "train needs ARTIFACT, --data and --out (or --resume RUN_DIR)")
        check_new_folder(args.out)
        for key in PATH_ARGS:
            if getattr(args, key):
                setattr(args, key, str(Path(getattr(args, key)).resolve()))
    check(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
    check(args.checkpoint_every is None or args.checkpoint_every >= 1,
          f"--checkpoint-every must be >= 1 steps, got {args.checkpoint_every}")
    artifact = load_artifact(args.artifact, device=args.device, threads=args.threads, backend=args.backend,
                             engine=getattr(args, "engine", "auto"),
                             engine_memory_mb=getattr(args, "engine_memory_mb", 256),
                             lean_memory=getattr(args, "lean_memory", False))
    params = artifact.initial_params()
    opt = make_optimizer(args, params)
    guard = DivergenceGuard(args.divergence_factor, args.on_divergence, log=log)
    train, val = load_train_val(args, artifact.manifest)
    n_rows = num_rows(train)
    check_batch_size(args.batch_size, n_rows)
    out = Path(args.out)
    position, history = (0, 0), []
    if args.resume:
        saved_params, state, info = checkpoint.load(out)
        check(saved_params.shape == params.shape and info["fingerprint"] == args.fingerprint,
              f"--resume {out}: {checkpoint.NAME} does not belong to this run's artifact")
        params[:] = saved_params
        opt.load_state_dict(state)
        position, history = tuple(info["position"]), info["history"]
        log(f"resuming at epoch {position[0] + 1}, batch {position[1]} (step {opt.steps})")
    else:
        from .checkpoint import fingerprint
        args.fingerprint = fingerprint(args.artifact)
        out.mkdir(parents=True, exist_ok=True)
        save_json(out / RUN_CONFIG, {k: v for k, v in vars(args).items() if k not in ("func", "resume")})
    from .data import batches_per_epoch
    per_epoch = batches_per_epoch(n_rows, args.batch_size, drop_last=artifact.fixed_batch is not None)

    def on_step(epoch, b, result):
        if args.checkpoint_every and opt.steps % args.checkpoint_every == 0 and not result.diverged:
            nxt = (epoch, b + 1) if b + 1 < per_epoch else (epoch + 1, 0)
            checkpoint.save(out, params, opt.state_dict(),
                            {"position": nxt, "history": history, "fingerprint": args.fingerprint})

    log(f"training {artifact.num_params} params on {n_rows} rows with {args.optimizer} "
        f"({', '.join(f'{k}={v}' for k, v in optimizer_settings(opt).items() if k != 'type')}) "
        f"on {artifact.device} via {artifact.backend}")
    artifact.fast_engine()
    if artifact.engine_note:
        log(artifact.engine_note)
    start = time.perf_counter()
    fit(artifact, opt, train, args.batch_size, args.epochs, seed=args.seed, val_data=val,
        log=log, start_epoch=position[0], start_batch=position[1],
        on_step=on_step, on_epoch=history.append, guard=guard)
    metrics = {"optimizer": args.optimizer, "settings": optimizer_settings(opt), "steps": opt.steps,
               "device": artifact.device, "seconds": time.perf_counter() - start, "history": history,
               "divergence_events": guard.events, "resumed": bool(args.resume), "backend": artifact.backend,
               "engine": "naive" if artifact.fast_engine() is None else artifact.engine_name,
               "engine_paths": artifact.tensor_paths() if artifact.backend == "onnxruntime" else {}}
    metrics["rss_baseline_mb"] = baseline
    return write_run(args, artifact.file("inference"), artifact.manifest, params, metrics, log)


def write_run(args, inference_path, manifest, params, metrics, log=print):
    """params.npy, trained.onnx and metrics.json into the run folder, each written atomically."""
    from .memory import peak_rss_mb
    from .files import save_json, save_npy
    from .writeback import write_back
    out = Path(args.out)
    metrics = {"artifact": str(Path(args.artifact).resolve()), **metrics, "batch_size": args.batch_size,
               "epochs": args.epochs, "seed": args.seed, "peak_rss_mb": peak_rss_mb(),
               "torch_imported": sys.modules.get("torch") is not None}
    if "rss_baseline_mb" in metrics:  # the rise over the process's size after its imports
        metrics["rss_rise_mb"] = metrics["peak_rss_mb"] - metrics["rss_baseline_mb"]
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / "params.npy", params)
    write_back(inference_path, manifest["trainable"], params, out / "trained.onnx",
               {"optimizer": metrics["optimizer"], "settings": metrics.get("settings", {}), "steps": metrics["steps"]},
               lora=manifest.get("lora", ()))
    save_json(out / "metrics.json", metrics)
    log(f"wrote {out}/params.npy, trained.onnx, metrics.json")
    return metrics



def train(artifact, data, out, log=print, **settings):
    """Train `artifact` on `data` into the new run folder `out` (settings as the CLI's flags, underscored:
    optimizer, lr, eps, budget, memory, gamma, weight_decay, batch_size, epochs, val_data, checkpoint_every,
    engine, ...). Returns metrics.json's content."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    check(not unknown, f"unknown training setting {unknown[0] if unknown else ''!r}; see run.DEFAULTS")
    from .files import check_new_folder
    check_new_folder(out)
    return _train(Namespace(**dict(DEFAULTS, **settings, artifact=str(artifact), data=str(data), out=str(out))), log)


def resume(run_dir, log=print):
    """Continue the run in `run_dir` from its checkpoint, bit-identically; returns metrics.json's content."""
    return _train(Namespace(**dict(DEFAULTS, artifact=None, resume=str(run_dir))), log)


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
                 lora=manifest.get("lora", ()))
