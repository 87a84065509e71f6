"""The `edgezo` command line. User errors print one line and exit with code 2."""
import argparse
import json
import sys
import time
from pathlib import Path

from .runtime.errors import EdgezoError, check
from .exporters.config import ExportConfig, Selection
from .runtime.config import RunConfig, add_flags, from_namespace
from .runtime.run import load_train_val, write_run


def prepare_out(out):
    from .runtime.files import check_new_folder
    return check_new_folder(out)


def cmd_export(args):
    from .exporters.models import builtin
    from .exporters.torch_export import export_module
    prepare_out(args.out)
    model, x, y, loss = builtin(args.model, seed=args.seed, batch=args.batch_size)
    selection = from_namespace(args, Selection)
    formats = ("onnx", "pte") if args.pte else ("onnx",)
    if args.lora:  # adapters live in the ONNX graph: export the frozen model, then add them as export-onnx does
        import tempfile
        from .exporters.onnx_import import export_onnx
        check(not args.pte, "--lora with --pte is not supported (adapters live in the ONNX loss graph)")
        with tempfile.TemporaryDirectory() as tmp:
            full = export_module(model, x, y, loss, Path(tmp) / "full")
            path = export_onnx(full / "inference.onnx", args.out, loss, trainable=args.trainable,
                               last_layers=args.last_layers, norms=args.norms, biases=args.biases, lora=args.lora,
                               lora_targets_glob=args.lora_targets, seed=args.seed)
    else:
        path = export_module(model, x, y, loss, args.out, formats=formats, select=selection)
    from .runtime.manifest import read
    print(f"exported {args.model} ({read(Path(path) / 'manifest.json')['num_params']} trainable params) to {path}")


def cmd_train(args):
    from .runtime import run
    log = lambda line: print(line, flush=True)  # noqa: E731
    config = from_namespace(args)
    if args.resume:
        defaults = RunConfig()
        given = [f"--{k.replace('_', '-')}" for k, v in vars(config).items()
                 if k != "artifact" and v != getattr(defaults, k)]
        check(not given, f"--resume continues a run with its own settings; {given[0] if given else ''} does not apply")
        run.resume(args.resume, artifact=args.artifact, log=log)
    else:
        run.train(config=config, log=log)


def cmd_train_torch(args):
    from .devices.memory import rss_mb
    from .reference import fit_torch
    from .runtime.manifest import read
    baseline = rss_mb()  # after torch's import, as edgezo train's is after onnxruntime's
    prepare_out(args.out)
    check(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
    manifest = read(Path(args.artifact) / "manifest.json")
    train, val = load_train_val(RunConfig(data=args.data, val_data=args.val_data, val_fraction=args.val_fraction,
                                          target_columns=args.target_columns, seed=args.seed), manifest)
    print(f"training {manifest['num_params']} params with torch {args.optimizer} (backprop)", flush=True)
    start = time.perf_counter()
    history, params = fit_torch(args.artifact, args.optimizer, train, args.batch_size, args.epochs, args.lr,
                                seed=args.seed, val_data=val, weight_decay=args.weight_decay,
                                log=lambda line: print(line, flush=True))
    metrics = {"optimizer": f"torch-{args.optimizer}", "settings": {"lr": args.lr, "weight_decay": args.weight_decay},
               "steps": history[-1]["steps"], "device": "cpu", "seconds": time.perf_counter() - start,
               "history": history, "rss_baseline_mb": baseline}
    write_run(args.out, args.artifact, args.batch_size, args.epochs, args.seed,
              Path(args.artifact) / manifest["files"]["inference"], manifest, params, metrics)


def cmd_eval(args):
    from .runtime import load_artifact
    from .runtime.data import load_data
    from .runtime.train import evaluate
    artifact = load_artifact(args.artifact, device=args.device)
    from .runtime.files import load_params
    params = load_params(args.params, artifact.num_params, "--params ")
    result = evaluate(artifact, params, load_data(args.data, artifact.manifest, args.target_columns))
    print(json.dumps(result))


def cmd_export_onnx(args):
    from .exporters.onnx_import import export_onnx, load_model
    if args.list:
        from .exporters.presets import print_listing
        print_listing(load_model(args.model), args.model)
        return
    check(args.out is not None, "export-onnx needs --out (or --list)")
    prepare_out(args.out)
    path = export_onnx(args.model, args.out, config=from_namespace(args, ExportConfig),
                       log=lambda line: print(line, flush=True))
    from .runtime.manifest import read
    manifest = read(Path(path) / "manifest.json")
    names = [t["name"] for t in manifest["trainable"]]
    shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    print(f"exported {args.model}: {manifest['num_params']} trainable params in {len(names)} tensors ({shown}) "
          f"to {path}")


def cmd_write_back(args):
    from .runtime.run import write_back_params
    write_back_params(args.artifact, args.params, args.out, "PARAMS ")
    print(f"wrote {args.out} (the inference model with the trained values)")


def cmd_profile(args):
    from .profile import profile
    profile(args.artifact, args.out, batch_size=args.batch_size, steps=args.steps, device=args.device,
            budget=args.budget, engine_memory_mb=args.engine_memory_mb)


def cmd_plan(args):
    from .devices.detect import PROFILES
    from .devices.plan import Planner, target_limit_mb
    limit = target_limit_mb(args.target, args.memory_limit_mb)
    print("calibrating on this machine (two short runs) ...", flush=True)
    planner = Planner(args.artifact, budget=args.budget)
    plan = planner.plan(limit, args.engine_cap_mb)
    name = PROFILES.get(args.target, ("this machine",))[0]
    print(f"{name}: {limit:.0f} MiB for training -> --batch-size {plan['batch_size']} --memory {plan['memory']} "
          f"--engine-memory-mb {plan['engine_memory_mb']:.0f}; predicted peak RSS {plan['predicted_peak_mb']:.0f} MiB "
          f"(baseline {planner.baseline:.0f} + runtime {planner.overhead:.0f} MiB, engine residency "
          f"{planner.alpha:.2f} of its cap; calibrated here)")
    if args.out:
        from .runtime.files import save_json
        save_json(args.out, {"target": args.target, **plan, "baseline_mb": planner.baseline,
                             "overhead_mb": planner.overhead, "engine_alpha": planner.alpha})


def cmd_demo(args):
    if args.task == "sarcos":
        from .demo import run_demo
        args.epochs = args.epochs or 12
        run_demo(args)
    else:
        check(args.sarcos is None, "--sarcos belongs to --task sarcos")
        from .adapt_demo import run_adapt_demo
        run_adapt_demo(args.out, args.epochs or 20, args.task)


def build_parser():
    parser = argparse.ArgumentParser(prog="edgezo", description="Forward-only on-device training (CoCD).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a built-in torch model to an artifact folder (needs torch)")
    p.add_argument("--model", required=True, help="sarcos-mlp, mnist-cnn, paper-cnn, paper-cnn-leaky or resnet20")
    p.add_argument("--out", required=True, help="artifact folder to create")
    p.add_argument("--seed", type=int, default=0, help="weight initialization seed")
    p.add_argument("--pte", action="store_true", help="also write model.pte (ExecuTorch)")
    p.add_argument("--batch-size", type=int, default=64, help="example batch; the fixed batch of model.pte")
    add_flags(p, Selection)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("export-onnx", help="make an artifact from an ONNX inference model (no torch)",
                       description="Make a training artifact from a deployed ONNX model. Choose what to train with "
                       "any combination of --trainable, --last-layers, --norms, --biases and --lora; --list shows "
                       "the tensors and what each preset would train.")
    p.add_argument("model", help="the deployed model, an .onnx file (any opset >= 7; Constant-node weights are "
                   "trainable too)")
    add_flags(p, ExportConfig)  # exporters.config.ExportConfig: the flags are its fields
    p.add_argument("--list", action="store_true", help="print the model's tensors and what each preset trains")
    p.add_argument("--out", help="artifact folder to create")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("write-back", help="the artifact's inference model with trained values, as a plain ONNX file")
    p.add_argument("artifact")
    p.add_argument("params", help="trained params.npy (metadata is taken from metrics.json beside it)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.set_defaults(func=cmd_write_back)

    p = sub.add_parser("train", help="train an artifact forward-only (no torch)",
                       description="Train an artifact forward-only (no torch). Optimizer settings not given take the "
                       "optimizer's defaults; one it does not use is refused. Every flag is a field of "
                       "edgezo.runtime.config.RunConfig, which the Python API (runtime.run.train) takes too.")
    add_flags(p)  # runtime.config.RunConfig: one place for Python and CLI users
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its checkpoint, "
                   "bit-identically (with its own settings)")
    p.set_defaults(func=cmd_train)

    from .tune import add_parser as add_tune  # Ray is imported only when `edgezo tune` runs
    add_tune(sub)
    from .fleet_cli import add_parser as add_fleet  # Flower is imported only when `edgezo fleet` runs
    add_fleet(sub)

    p = sub.add_parser("train-torch", help="first-order reference: torch SGD/momentum/Adam on reference.pt2")
    p.add_argument("artifact")
    p.add_argument("--data", required=True)
    p.add_argument("--val-data")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--target-columns", type=int)
    p.add_argument("--out", required=True)
    p.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_torch)

    p = sub.add_parser("eval", help="loss (and accuracy) of trained params on a dataset")
    p.add_argument("artifact")
    p.add_argument("--params", required=True, help="params.npy from a run folder")
    p.add_argument("--data", required=True)
    p.add_argument("--target-columns", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("profile", help="peak memory of CoCD (forward-only) vs torch SGD/momentum/Adam, each in a "
                                      "fresh process")
    p.add_argument("artifact")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--budget", type=int, default=64, help="CoCD coordinates per step")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--engine-memory-mb", type=float, default=256)
    p.add_argument("--out", required=True, help="folder for profile.json and profile.png")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("plan", help="the largest batch, buffer m and engine chunk that fit a device's memory")
    p.add_argument("artifact")
    p.add_argument("--target", default="local", help="a device profile (orin-nano-8gb, agx-orin-64gb, ...) or local")
    p.add_argument("--memory-limit-mb", type=float, help="memory training may use (overrides the profile)")
    p.add_argument("--budget", type=int, default=64, help="CoCD coordinates per step")
    p.add_argument("--engine-cap-mb", type=float, default=256, help="the largest engine chunk to consider")
    p.add_argument("--out", help="write the plan as JSON here")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="adapt a deployed classifier forward-only (CoCD, BCCD, MeZO vs backprop SGD); "
                       "--task sarcos: the paper's SARCOS MLP from scratch")
    p.add_argument("--task", choices=("int8", "adapt", "sarcos"), default="int8",
                   help="int8 (default): the deployed digit classifier, quantized to int8, meets Fashion-MNIST with a "
                   "new int8 head (written back as int8; backprop cannot train it); adapt: the same on the fp32 "
                   "model; sarcos: robot-arm inverse dynamics from scratch")
    p.add_argument("--out", default="runs/demo", help="folder for results (replaced if it exists)")
    p.add_argument("--epochs", type=int, help="default 20 (int8, adapt) or 12 (sarcos)")
    p.add_argument("--sarcos", help="a sarcos_inv.mat to use instead of the built-in arm model")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except EdgezoError as e:
        print(f"edgezo: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk full or a file limit while writing: one line, no traceback
        print(f"edgezo: error: {e.strerror or e} ({getattr(e, 'filename', '') or 'while writing'})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
