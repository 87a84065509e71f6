"""The paper's benchmarks (CoCD, ICML 2026, Table 1 settings) from one script.

Tasks:
  sarcos     MLP 21-64-64-64-32-7 on SARCOS (the 4,449-row split in ../shared, split by seed 80/20 into
             train and validation; --sarcos for the full sarcos_inv.mat), batch 64: CoCD (lr 1e-3,
             gamma 1.0, eps 1.0, B 64), BCCD (eps 1e-6), torch SGD momentum 0.9 (lr 1e-2).
  mnist      --model paper-cnn (default; 19,654 params, see exporters/models.py) or mnist-cnn (21,578) on MNIST,
             batch 128: CoCD (lr 1e-2, gamma 0.99, eps 0.1, B 256), BCCD (eps 1e-6), torch SGD momentum 0.9
             (lr 1e-2). Test accuracy on the 10,000 test digits. --seeds 0 1 2: one run per seed.
  fashion    the same on Fashion-MNIST.
  mnist-ablations  MNIST CoCD at the paper's ablation defaults (gamma 1.0, eps 1.0, B 256, lr 1e-2), then eps,
             gamma, B and M one at a time (the paper's Fig. 3 on MNIST); use --epochs 20.
  resnet20   ResNet-20 (270k weights) on Fashion-MNIST padded to 3x32x32, CoCD B 2048, for --minutes;
             checkpointed in benchmarks/results/paper-resnet20, continued with --resume.
  ablations  SARCOS CoCD over eps, gamma, B and M = m/n in {1, 0.5, 0.25}; with --ablate M-lr also M in
             {0.5, 0.25} at lr / M (with m < n a coordinate moves only in M of the steps).
  mnist-gamma  MNIST CoCD at the paper's settings but gamma 0.9 and 0.95 (--gammas; the paper's CNN momentum
             ablation; gamma is the stability valve the authors' README recommends lowering).
  baselines  SARCOS at a matched budget of 64 evaluations per step: CoCD (B 32, central), SPSA (32
             directions), ZO-SGD (63 directions + base), MeZO-SGD (32 directions) (the paper's Fig. 4). No
             guard: a run whose loss turns non-finite or whose validation loss exceeds 10x its best is
             recorded as diverged at that step and ends.
All runs: weight decay 1e-4. SARCOS inputs and torques are standardized with the training split's
statistics (validation loss is MSE of standardized torques). Writes benchmarks/results/paper_<task>.json
and paper_<task>.png.

The paper's SARCOS runs use the full training split (44,484 rows: 696 steps per epoch); the 4,449-row
split in ../shared gives 56. --match-paper-steps runs the SARCOS tasks for as many epochs as the paper's
step count needs (50 paper epochs = 34,800 steps = 622 epochs of the small split).

Usage: python benchmarks/paper.py --tasks sarcos ablations baselines [--epochs 50]
       python benchmarks/paper.py --tasks sarcos ablations baselines --match-paper-steps
       python benchmarks/paper.py --tasks mnist --epochs 50     (about 30 s per CoCD epoch on 2 cores)
"""
import argparse
import math
import sys
import time

from common import RESULTS, SHARED, builtin_artifact, write_json
from edgezo.runtime import checkpoint
from edgezo.runtime import data as data_mod
from edgezo.runtime import load_artifact
from edgezo.runtime.errors import EdgezoError
from edgezo.runtime.optim import BCCD, SPSA, ZOSGD, CoCD, MeZOSGD
from edgezo.runtime.train import evaluate, fit
from paper_data import mnist_data, padded_fashion, sarcos_data
from paper_plot import plot

WD = 1e-4
PAPER_SARCOS_TRAIN_ROWS = 44_484
OPTIMIZERS = ["cocd", "bccd", "sgd"]  # Table 1's rows, in its order
ABLATIONS = {"eps": (0.1, 1.0, 3.0), "gamma": (0.0, 0.9, 0.99, 1.0), "budget": (16, 64, 256), "M": (1.0, 0.5, 0.25),
             "M-lr": (0.5, 0.25), "none": ()}  # none: mnist-ablations runs only its defaults
ABLATE_DEFAULT = ["eps", "gamma", "budget", "M"]
CURRENT = {"task": None, "name": None, "epochs": None, "runs": []}  # written after every run, so a long task keeps its results


def finished(result):
    CURRENT["runs"].append(result)
    write_json(CURRENT["name"], CURRENT)
    return result


def sarcos_epochs(args, train, batch=64):
    """--epochs, or with --match-paper-steps the epochs of this split that make the paper's step count."""
    if not args.match_paper_steps:
        return args.epochs
    paper_steps = args.epochs * data_mod.batches_per_epoch(PAPER_SARCOS_TRAIN_ROWS, batch)
    per_epoch = data_mod.batches_per_epoch(data_mod.num_rows(train), batch)
    epochs = -(-paper_steps // per_epoch)
    print(f"  --match-paper-steps: {epochs} epochs of {per_epoch} steps ~ {paper_steps} paper steps", flush=True)
    return epochs


class Diverged(Exception):
    pass


class AtChance(Exception):
    pass


CHANCE = 0.12  # test accuracy at or below this on 10 balanced classes counts as chance


def run(label, artifact, make_optimizer, train, val, batch, epochs, seed=0, watch=False, stop_at_chance=0):
    """One optimizer run. With watch (no guard, as in the paper's Fig. 4), a run diverges when a loss turns
    non-finite or its validation loss exceeds 10x its best: the step is recorded and the run ends there.
    With stop_at_chance N, a classifier whose test accuracy stayed at chance for N epochs in a row stops
    (recorded under "stopped")."""
    params = artifact.initial_params()
    opt = make_optimizer(params)
    start, history, diverged, stopped = time.perf_counter(), [], None, None

    def record_epoch(record):  # the run so far goes into the JSON after every epoch
        history.append(record)
        write_json(CURRENT["name"], dict(CURRENT, runs=CURRENT["runs"] + [{"label": label, "history": history,
                                                                          "steps": opt.steps, "seed": seed,
                                                                          "running": True}]), quiet=True)
        if watch:
            check_val(record)
        recent = [h.get("val_accuracy", 1.0) for h in history[-stop_at_chance:]]
        if stop_at_chance and len(recent) == stop_at_chance and max(recent) <= CHANCE:
            raise AtChance(f"test accuracy <= {CHANCE:.0%} for {stop_at_chance} epochs in a row")

    def check_val(record):
        best = min(h["val_loss"] for h in history)
        if not math.isfinite(record["val_loss"]) or record["val_loss"] > 10 * best:
            raise Diverged(f"validation loss {record['val_loss']:.4g} (best {best:.4g})")
    try:
        fit(artifact, opt, train, batch, epochs, seed=seed, val_data=val, on_epoch=record_epoch,
            log=lambda line: print(f"  {label}: {line}", flush=True))
    except (Diverged, EdgezoError) as err:  # EdgezoError: tell() refuses a non-finite loss
        if not watch:
            raise
        diverged = {"step": opt.steps + (0 if isinstance(err, Diverged) else 1), "reason": str(err)}
        print(f"  {label}: diverged at step {diverged['step']}: {err}", flush=True)
    except AtChance as err:
        stopped = {"epoch": len(history), "step": opt.steps, "reason": str(err)}
        print(f"  {label}: stopped after epoch {len(history)}: {err}", flush=True)
    return finished({"label": label, "history": history, "seconds": time.perf_counter() - start,
                     "steps": opt.steps, "seed": seed, "diverged": diverged, "stopped": stopped})


def run_sgd(label, model, train, val, batch, epochs, lr=1e-2, seed=0):
    from edgezo.reference import fit_torch
    start = time.perf_counter()
    history, _ = fit_torch(builtin_artifact(model, seed), "momentum", train, batch, epochs, lr, seed=seed, val_data=val,
                           weight_decay=WD, log=lambda line: print(f"  {label}: {line}", flush=True))
    return finished({"label": label, "history": history, "seconds": time.perf_counter() - start,
                     "steps": history[-1]["steps"], "seed": seed})


def compare(args, model, train, val, batch, epochs, lr, cocd):
    """Table 1's three rows for one task (those in --optimizers), each at every --seeds (weight init and data
    order): CoCD (its paper settings, gamma from --gamma where given), BCCD (eps 1e-6), SGD momentum 0.9."""
    budget, label = cocd["budget"], "CoCD"
    if args.gamma is not None:
        cocd, label = dict(cocd, gamma=args.gamma), f"CoCD gamma={args.gamma}"
    runs = []
    for seed in args.seeds:
        art, tag = cpu_artifact(args, model, seed), "" if args.seeds == [0] else f" seed={seed}"
        stop = args.stop_at_chance
        rows = {"cocd": lambda: run(label + tag, art, lambda p: CoCD(p, lr=lr, weight_decay=WD, **cocd), train, val,
                                    batch, epochs, seed, stop_at_chance=stop),
                "bccd": lambda: run("BCCD" + tag, art, lambda p: BCCD(p, lr=lr, eps=1e-6, budget=budget,
                                                                      weight_decay=WD), train, val, batch, epochs, seed,
                                    stop_at_chance=stop),
                "sgd": lambda: run_sgd("SGD momentum 0.9" + tag, model, train, val, batch, epochs, seed=seed)}
        runs += [rows[name]() for name in args.optimizers]
    return runs


def cpu_artifact(args, model, seed=0):
    return load_artifact(builtin_artifact(model, seed), device="cpu", threads=args.threads)


def task_sarcos(args):
    train, val = sarcos_data(args.sarcos)
    return compare(args, "sarcos-mlp", train, val, 64, sarcos_epochs(args, train),
                   1e-3, dict(eps=1.0, budget=64, gamma=1.0))


def task_mnist(args, folder="mnist"):
    train, test = mnist_data(SHARED / "datasets" / folder, args.standardize)
    return compare(args, args.model, train, test, 128, args.epochs, 1e-2,
                   dict(eps=0.1, budget=256, gamma=0.99))


def task_mnist_gamma(args):
    train, test = mnist_data(SHARED / "datasets" / "mnist", args.standardize)
    art = cpu_artifact(args, args.model)
    return [run(f"CoCD gamma={gamma}", art, lambda p, g=gamma: CoCD(p, lr=1e-2, eps=0.1, budget=256, gamma=g,
                                                                  weight_decay=WD), train, test, 128, args.epochs)
            for gamma in args.gammas]


def ablation_settings(ablate, base, n, skip_base=False):
    """(label, CoCD settings) with one setting of `base` changed at a time, for each value of the keys in
    `ablate` (skip_base: not the values that equal base, with memory n where it is not given, CoCD's default)."""
    def full(settings):
        return {"memory": n, **settings}
    out = []
    for key, value in [(key, v) for key in ablate for v in ABLATIONS[key]]:
        settings = dict(base)
        if key.startswith("M"):
            settings["memory"] = max(1, int(round(value * n)))
            if key == "M-lr":  # a coordinate moves only while in the m-slot window: lr / M restores its travel per cycle
                settings["lr"] = base["lr"] / value
        else:
            settings[key] = value
        if not (skip_base and full(settings) == full(base)):
            out.append((f"{key}={value}", settings))
    return out


def ablation_runs(args, art, base, train, val, batch, epochs, skip_base=False):
    variants = ablation_settings(args.ablate, base, art.num_params, skip_base)
    if args.only:
        unknown = sorted(set(args.only) - {label for label, _ in variants})
        if unknown:
            raise EdgezoError(f"--only {unknown} not among this task's runs {[label for label, _ in variants]}")
        variants = [(label, s) for label, s in variants if label in args.only]
    return [run(label, art, lambda p, s=settings: CoCD(p, **s), train, val, batch, epochs,
                stop_at_chance=args.stop_at_chance) for label, settings in variants]


def task_ablations(args):
    train, val = sarcos_data(args.sarcos)
    base = dict(lr=1e-3, eps=1.0, budget=64, gamma=1.0, weight_decay=WD)
    return ablation_runs(args, cpu_artifact(args, "sarcos-mlp"), base, train, val, 64, sarcos_epochs(args, train))


def task_mnist_ablations(args):
    """The paper's MNIST ablation defaults (gamma 1.0, eps 1.0, B 256; lr 1e-2, batch 128), then one setting at a
    time; the first run is the defaults themselves."""
    train, test = mnist_data(SHARED / "datasets" / "mnist", args.standardize)
    base = dict(lr=1e-2, eps=1.0, budget=256, gamma=1.0, weight_decay=WD)
    art = cpu_artifact(args, args.model)
    runs = [] if args.skip_defaults else [run("defaults (gamma 1, eps 1, B 256)", art, lambda p: CoCD(p, **base),
                                              train, test, 128, args.epochs, stop_at_chance=args.stop_at_chance)]
    return runs + ablation_runs(args, art, base, train, test, 128, args.epochs, skip_base=True)


def task_baselines(args):
    """Fig. 4: 64 evaluations per step each, lr and mu of the 50-epoch runs, no guard (diverged runs end early)."""
    train, val = sarcos_data(args.sarcos)
    art = cpu_artifact(args, "sarcos-mlp")
    epochs = sarcos_epochs(args, train)
    methods = [("CoCD B=32 (64 evals)", lambda p: CoCD(p, lr=1e-3, eps=1.0, budget=32, weight_decay=WD)),
               ("SPSA q=32 (64 evals)", lambda p: SPSA(p, lr=1e-4, mu=1e-2, directions=32)),
               ("ZO-SGD q=63 (64 evals)", lambda p: ZOSGD(p, lr=1e-4, mu=1e-2, directions=63)),
               ("MeZO-SGD q=32 (64 evals)", lambda p: MeZOSGD(p, lr=1e-4, mu=1e-2, directions=32))]
    return [run(label, art, make, train, val, 64, epochs, watch=True) for label, make in methods]


RESNET_RUN = RESULTS / "paper-resnet20"  # committed, so a fresh clone continues the run


def task_resnet20(args):
    """ResNet-20 (Fashion-MNIST padded to 32x32), CoCD B 2048 (lr 1e-2, eps 0.1, gamma 0.99), batch 128, for
    --minutes of wall time; a checkpoint after every step in benchmarks/results/paper-resnet20; --resume
    continues it. Test accuracy on the first 1,000 test images every --eval-every steps."""
    train, test = padded_fashion(limit=1000)
    art = cpu_artifact(args, "resnet20")
    params = art.initial_params()
    opt = CoCD(params, lr=1e-2, eps=0.1, budget=2048, gamma=0.99, weight_decay=WD)
    curve, position, spent = [], (0, 0), 0.0
    if args.resume:
        saved, state, info = checkpoint.load(RESNET_RUN)
        params[:] = saved
        opt.load_state_dict(state)
        curve, position, spent = info["curve"], tuple(info["position"]), info["seconds"]
        print(f"  resuming at step {opt.steps} ({spent / 60:.1f} min trained)", flush=True)
    deadline, start = time.perf_counter() + 60 * args.minutes, time.perf_counter() - spent
    per_epoch = data_mod.batches_per_epoch(data_mod.num_rows(train), 128)

    def on_step(epoch, b, result):
        point = {"step": opt.steps, "train_loss": result.loss, "seconds": time.perf_counter() - start}
        if opt.steps % args.eval_every == 0:
            point.update({f"test_{k}": v for k, v in evaluate(art, params, test).items()})
        curve.append(point)
        print(f"  ResNet-20 step {opt.steps}: loss {result.loss:.4f} ({result.seconds:.1f} s)"
              + (f", test acc {100 * point['test_accuracy']:.1f}%" if "test_accuracy" in point else ""), flush=True)
        nxt = (epoch, b + 1) if b + 1 < per_epoch else (epoch + 1, 0)
        # a step takes minutes: a checkpoint after each
        checkpoint.save(RESNET_RUN, params, opt.state_dict(),
                        {"position": nxt, "curve": curve, "seconds": point["seconds"]})
        CURRENT["runs"] = [{"label": "CoCD B=2048", "curve": curve, "steps": opt.steps, "seconds": point["seconds"],
                            "history": [], "seconds_per_step": point["seconds"] / max(1, len(curve)),
                            "steps_per_epoch": per_epoch, "continue": "python benchmarks/paper.py --tasks "
                            "resnet20 --resume --minutes M"}]
        write_json(CURRENT["name"], CURRENT)
        if time.perf_counter() > deadline:
            raise Diverged("time is up")  # ends fit(); the checkpoint above holds the state
    try:
        fit(art, opt, train, 128, 1, seed=0, log=None, start_epoch=position[0], start_batch=position[1],
            on_step=on_step)
    except Diverged:
        pass
    return CURRENT["runs"]


TASKS = {"sarcos": task_sarcos, "mnist": task_mnist, "fashion": lambda a: task_mnist(a, "fashion-mnist"),
         "ablations": task_ablations, "mnist-gamma": task_mnist_gamma, "baselines": task_baselines,
         "mnist-ablations": task_mnist_ablations, "resnet20": task_resnet20}


CNN_TASKS = ("mnist", "fashion", "mnist-gamma", "mnist-ablations")


def result_name(args, task, matched):
    """paper_<task>, plus what differs from the default run: _paper_steps, _<optimizers>, _gamma<g>, _<ablate>,
    _std."""
    name = f"paper_{task}" + ("_paper_steps" if matched else "")
    if task in ("sarcos", "mnist", "fashion"):
        if args.optimizers != OPTIMIZERS:
            name += "_" + "_".join(args.optimizers)
        if args.gamma is not None:
            name += f"_gamma{args.gamma:g}"
    if task in ("ablations", "mnist-ablations") and args.ablate != ABLATE_DEFAULT:
        name += "_" + "_".join(args.ablate)
    if task in CNN_TASKS:
        if args.model != "mnist-cnn":  # the earlier results (mnist-cnn) keep their names
            name += f"_{args.model}"
        if args.standardize:
            name += "_std"
    if task in ("sarcos", "mnist", "fashion") and args.seeds != [0]:
        name += "_seed" + "-".join(map(str, args.seeds))
    return name


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["sarcos", "ablations", "baselines"])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--ablate", nargs="+", choices=list(ABLATIONS),
                        default=ABLATE_DEFAULT,
                        help="ablations: which settings to vary (M-lr: M in {0.5, 0.25} with lr scaled by 1/M; none: "
                        "mnist-ablations runs its defaults only)")
    parser.add_argument("--gammas", nargs="+", type=float, default=[0.9, 0.95], help="mnist-gamma: the gammas to run")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=OPTIMIZERS,
                        help="sarcos, mnist, fashion: which of Table 1's rows to run")
    parser.add_argument("--gamma", type=float, default=None,
                        help="sarcos, mnist, fashion: CoCD's gamma instead of the paper's (1.0 SARCOS, 0.99 CNN)")
    parser.add_argument("--standardize", action="store_true",
                        help="mnist, fashion: standardize pixels by the training set's mean and std (default [0, 1])")
    parser.add_argument("--model", choices=("paper-cnn", "mnist-cnn", "paper-cnn-leaky"), default="paper-cnn",
                        help="mnist, fashion, mnist-gamma, mnist-ablations: the CNN (paper-cnn: 19,654 weights, fits "
                        "both of the paper's budget percentages; mnist-cnn: the earlier 21,578-weight CNN; "
                        "paper-cnn-leaky: paper-cnn with LeakyReLU(0.01), whose channels cannot die)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="sarcos, mnist, fashion: weight-init and data-order seeds, one run each")
    parser.add_argument("--minutes", type=float, default=120, help="resnet20: wall-clock minutes to train")
    parser.add_argument("--eval-every", type=int, default=10, help="resnet20: test accuracy every N steps")
    parser.add_argument("--resume", action="store_true",
                        help="resnet20: continue from benchmarks/results/paper-resnet20/checkpoint.npz")
    parser.add_argument("--stop-at-chance", type=int, default=0, metavar="N",
                        help="mnist, fashion, mnist-ablations: end a CoCD/BCCD run whose test accuracy stayed at "
                        "chance (<= 12%%) for N epochs in a row (recorded as stopped; 0: never)")
    parser.add_argument("--skip-defaults", action="store_true",
                        help="mnist-ablations: leave out the run at the defaults (when another process runs it)")
    parser.add_argument("--only", nargs="+", metavar="KEY=VALUE",
                        help="ablations, mnist-ablations: only these of the --ablate runs (e.g. gamma=0.99 M=0.25)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime and engine threads per run")
    parser.add_argument("--out", default=None, help="results file stem under benchmarks/results (default "
                        "paper_<task>, plus _paper_steps, _<optimizers>, _gamma<g>, _<ablate>, _std where they are given)")
    parser.add_argument("--match-paper-steps", action="store_true",
                        help="SARCOS tasks: run the paper's number of optimizer steps (more epochs of a small split)")
    parser.add_argument("--sarcos", default=str(SHARED / "datasets" / "sarcos" / "sarcos_inv_test.mat"),
                        help="SARCOS .mat (the full sarcos_inv.mat when you have it)")
    args = parser.parse_args()
    for task in args.tasks:
        print(f"== {task} ({args.epochs} epochs)", flush=True)
        matched = args.match_paper_steps and task in ("sarcos", "ablations", "baselines")
        name = args.out or result_name(args, task, matched)
        CURRENT.update(task=task, name=name, epochs=args.epochs, match_paper_steps=matched, runs=[])
        runs = TASKS[task](args)
        final = []
        for r in runs:
            if not r["history"]:
                continue
            last = r["history"][-1]
            metric = f"acc {100 * last['val_accuracy']:.2f}%" if "val_accuracy" in last else \
                f"val MSE {last['val_loss']:.4f}"
            note = f", diverged at step {r['diverged']['step']}" if r.get("diverged") else ""
            note += f", stopped at chance after epoch {r['stopped']['epoch']}" if r.get("stopped") else ""
            final.append(f"  {r['label']:<28} {metric}  ({r['seconds']:.0f} s, {r['steps']} steps{note})")
        print("\n".join(final), flush=True)
        plot(task, runs, RESULTS / f"{name}.png")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except EdgezoError as err:
        sys.exit(f"error: {err}")
