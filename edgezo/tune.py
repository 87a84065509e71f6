"""`edgezo tune`: hyperparameter search over `edgezo train` runs on Ray Tune (Optuna's TPE proposes, ASHA stops
poor trials early on validation loss). Each trial is a run folder written by the same code as `edgezo train`
(runtime.run.train), torch-free; DIR/best.json holds the `edgezo train` command that reproduces the best trial.

    DIR/tune_config.json   what was asked (read by --resume)
    DIR/ray/               Ray Tune's experiment (its state, for --resume; crashed trials keep their error there)
    DIR/trials/ID/         each trial's run folder (and ID.log, its training log)
    DIR/tune.json, best.json, tune.png   written at the end
"""
import json
import logging
import math
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .runtime.config import RunConfig
from .runtime.errors import EdgezoError, check
from .tune_space import describe, parse_space, parse_tries, to_ray

TUNE_CONFIG = "tune_config.json"


@dataclass
class TuneSettings:
    """What `edgezo tune` was asked; saved as DIR/tune_config.json so --resume continues the same search."""
    base: dict                   # RunConfig.to_json() shared by every trial (the tuned fields are filled per trial)
    out: str
    trials: int = 20
    steps: int = 200
    eval_every: int = 20
    space: list = field(default_factory=list)   # the --space strings
    concurrent: int = 1
    grace_steps: int = None      # ASHA's first rung (default: 2 evaluations)
    time_budget_min: float = None
    memory_limit_mb: float = None
    address: str = None
    seed: int = 0
    tries: list = field(default_factory=list)   # the --try strings: settings tried before the searcher's

    def config(self):
        return RunConfig.from_json(self.base)

    def parsed_space(self):
        space = parse_space(self.base["optimizer"], self.space)
        fixed = {k for k, v in self.base.items() if k in space and v is not None}
        given = {item.split("=", 1)[0].replace("-", "_") for item in self.space}
        both = sorted(fixed & given)
        check(not both, f"--{both[0].replace('_', '-') if both else ''} is both fixed and in --space; give one")
        return {k: d for k, d in space.items() if k not in fixed}  # a fixed flag takes a setting out of the search


class _Diverged(Exception):
    pass


def run_trial(params, base, trials_dir):
    """One trial (in a Ray worker): an edgezo training run reporting its validation loss every eval_every steps.
    A diverging run (non-finite validation loss, or the divergence guard stopping it) ends at once and reports
    its worst finite validation loss, so the searcher learns the region is bad; any other error is Ray's."""
    from ray import tune
    from .runtime import run
    from .runtime.train import DivergenceError
    out = Path(trials_dir) / tune.get_context().get_trial_id()
    if out.exists():  # a trial restarted by --resume starts again from step 0
        shutil.rmtree(out)
    config = replace(RunConfig.from_json(base), **params, out=str(out))
    seen = []

    def on_eval(record):
        if not math.isfinite(record["val_loss"]):
            raise _Diverged()
        seen.append(record)
        tune.report({**record, "diverged": False})

    with open(f"{out}.log", "w") as log:
        try:
            run.train(config=config, log=lambda line: print(line, file=log, flush=True), on_eval=on_eval)
        except (_Diverged, DivergenceError) as e:
            check(seen, f"trial {out.name}: the validation loss is not finite before training")
            worst = max(r["val_loss"] for r in seen)
            print(f"diverged ({e or 'non-finite validation loss'}): reporting the worst validation loss "
                  f"{worst:.6g}", file=log)
            tune.report({**seen[-1], "val_loss": worst, "diverged": True})


def _progress_callback(total, steps, log):
    from ray import tune

    class OneLinePerTrial(tune.Callback):
        """One line per finished trial (and the best so far) instead of Ray's status tables."""
        def __init__(self):
            self.done, self.best = 0, (math.inf, None)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            self.done += 1
            loss, step = r.get("val_loss", math.nan), r.get("step", 0)
            if loss < self.best[0]:
                self.best = (loss, trial.trial_id)
            how = "diverged" if r.get("diverged") else "finished" if step >= steps else "stopped early"
            values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
            log(f"trial {self.done}/{total} {trial.trial_id}: val loss {loss:.5g} at step {step} ({how}; {values}); "
                f"best {self.best[0]:.5g} ({self.best[1]})")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            log(f"trial {self.done}/{total} {trial.trial_id}: failed (Ray kept its error under "
                f"{trial.path or 'the experiment folder'})")

    return OneLinePerTrial()


def _plan_memory(settings, space, log):
    """--memory-limit-mb: the planner's batch and engine chunk for the largest budget in the space."""
    from .devices.plan import Planner
    config = settings.config()
    budget = int(space["budget"].upper()) if "budget" in space else config.hyper().get("budget", 64)
    log(f"planning for {settings.memory_limit_mb:.0f} MiB (two short calibration runs) ...")
    planner = Planner(config.artifact, budget=budget)
    plan = planner.plan(settings.memory_limit_mb, config.engine_memory_mb)
    check("batch_size" not in space, "--memory-limit-mb chooses the batch size: leave batch_size out of --space")
    batch = min(config.batch_size, plan["batch_size"])  # the given batch, smaller where it does not fit
    peak = planner.predict(batch, planner.n, plan["engine_memory_mb"])
    log(f"every trial: --batch-size {batch} --engine-memory-mb {plan['engine_memory_mb']:.0f} "
        f"(predicted peak {peak:.0f} MiB of {settings.memory_limit_mb:.0f})")
    settings.base.update(batch_size=batch, engine_memory_mb=plan["engine_memory_mb"])


def _check_data(config):
    """The trials' data and batch size, checked once here rather than failing in every trial."""
    from .runtime.data import check_batch_size, num_rows
    from .runtime.manifest import read
    from .runtime.run import load_train_val
    train, _ = load_train_val(config, read(Path(config.artifact) / "manifest.json"))
    check_batch_size(config.batch_size, num_rows(train))


def _start_ray(settings):
    import ray
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no status tables
    import warnings
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", module="optuna")  # a trial restarted by --resume re-reports its steps
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, ignore_reinit_error=True)
    ray.init(address=settings.address, **kw) if settings.address else ray.init(num_cpus=os.cpu_count(), **kw)
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # a failed trial gets our one line, its error stays


def _tuner(settings, space, trainable, log):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch
    ray_dir = Path(settings.out) / "ray"
    if ray_dir.exists():
        log(f"resuming the tune in {settings.out}: finished trials are kept, unfinished ones start again")
        return tune.Tuner.restore(str(ray_dir), trainable, resume_unfinished=True, resume_errored=False)
    grace = settings.grace_steps or 2 * settings.eval_every
    scheduler = ASHAScheduler(time_attr="step", max_t=settings.steps, grace_period=min(grace, settings.steps),
                              reduction_factor=3)
    budget = settings.time_budget_min * 60 if settings.time_budget_min else None
    searcher = OptunaSearch(seed=settings.seed, points_to_evaluate=parse_tries(space, settings.tries) or None)
    return tune.Tuner(
        trainable, param_space=to_ray(space),
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", search_alg=searcher,
                                    scheduler=scheduler, num_samples=settings.trials,
                                    max_concurrent_trials=settings.concurrent, time_budget_s=budget,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="ray", storage_path=str(Path(settings.out).resolve()), verbose=0,
                                  callbacks=[_progress_callback(settings.trials, settings.steps, log)]))


def tune_run(settings, log=print):
    """Run (or, where DIR/ray exists, resume) the search; writes tune.json, best.json and tune.png; returns
    best.json's content."""
    from ray import tune
    from .tune_report import collect, write_outputs
    out = Path(settings.out).resolve()
    space = settings.parsed_space()
    check(space, "nothing to tune: every setting of the space is fixed by a flag")
    parse_tries(space, settings.tries)
    if settings.memory_limit_mb and not (out / "ray").exists():
        _plan_memory(settings, space, log)
    config = settings.config().check()
    _check_data(config)
    from .runtime.files import save_json
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / TUNE_CONFIG, asdict(settings))
    (out / "trials").mkdir(exist_ok=True)
    log(f"tuning {config.optimizer} on {config.artifact}: {settings.trials} trials of {settings.steps} steps, "
        f"{settings.concurrent} at a time ({config.threads} onnxruntime threads each); space: {describe(space)}")
    _start_ray(settings)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=settings.base, trials_dir=str(out / "trials")), {"cpu": config.threads})
    start = time.perf_counter()
    results = _tuner(settings, space, trainable, log).fit()
    seconds = time.perf_counter() - start
    trials = collect(results, settings.steps)
    check(any(t["val_loss"] is not None for t in trials), "no trial reported a validation loss (see DIR/ray)")
    if (out / "tune.json").exists():  # a resumed tune: its seconds add to the earlier ones
        seconds += json.loads((out / "tune.json").read_text())["seconds"]
    best = write_outputs(out, settings, space, trials, seconds, log)
    if len(trials) < settings.trials and not settings.time_budget_min:
        log(f"stopped after {len(trials)} of {settings.trials} trials: `edgezo tune --resume {out}` continues")
    return best


def command(settings, params, out, steps=None):
    """The `edgezo train` command that reproduces a trial with these tuned values (to `steps`, where a trial
    stopped early)."""
    config = replace(settings.config(), **params, out=str(out), steps=steps or settings.steps)
    return shlex.join(["edgezo", "train", *config.argv()])


def settings_from_args(args):
    """TuneSettings of parsed `edgezo tune` arguments; --resume DIR: the saved ones."""
    from .runtime.config import from_namespace
    if args.resume:
        path = Path(args.resume) / TUNE_CONFIG
        check(path.exists(), f"--resume {args.resume}: no {TUNE_CONFIG} (not a tune folder)")
        return TuneSettings(**json.loads(path.read_text()))
    check(args.out, "tune needs --out DIR (or --resume DIR)")
    check(not Path(args.out).exists() or not any(Path(args.out).iterdir()),
          f"--out {args.out} exists and is not empty (use --resume to continue a tune)")
    check(args.trials >= 1 and args.steps >= 1, "--trials and --steps must be >= 1")
    check(args.concurrent >= 1, f"--concurrent must be >= 1, got {args.concurrent}")
    check(args.val_data or args.val_fraction, "tune needs validation data: --val-data FILE or --val-fraction F")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.concurrent)
    eval_every = args.eval_every or max(1, args.steps // 10)
    config = replace(from_namespace(args), threads=threads, steps=args.steps, eval_every=eval_every, out=None)
    config = replace(config, **{k: str(Path(getattr(config, k)).resolve()) for k in ("artifact", "data", "val_data")
                                if getattr(config, k)})
    check(config.artifact and config.data, "tune needs ARTIFACT and --data")
    return TuneSettings(base=config.to_json(), out=str(Path(args.out).resolve()), trials=args.trials,
                        steps=args.steps, eval_every=eval_every, space=args.space or [], concurrent=args.concurrent,
                        grace_steps=args.grace_steps, time_budget_min=args.time_budget_min,
                        memory_limit_mb=args.memory_limit_mb, address=args.address, seed=args.seed,
                        tries=args.tries or [])


def add_parser(sub):
    from .runtime.config import add_flags
    p = sub.add_parser("tune", help="search lr / eps / gamma / budget / memory automatically (Ray Tune + Optuna)",
                       description="Search an optimizer's hyperparameters with short edgezo training runs on Ray "
                       "Tune: Optuna's TPE proposes settings, ASHA stops poor trials early on validation loss. "
                       "Writes DIR/tune.json (every trial's settings and curve), DIR/tune.png, DIR/best.json (with "
                       "the edgezo train command that reproduces the best trial). A training flag given (e.g. "
                       "--gamma 0.99) fixes that setting; --space adds or replaces ranges.")
    add_flags(p, skip=("out", "epochs", "steps", "eval_every", "checkpoint_every", "threads"))
    p.set_defaults(on_divergence="stop")
    p.add_argument("--trials", type=int, default=20, help="how many settings to try")
    p.add_argument("--steps", type=int, default=200, help="training steps (batches) per trial")
    p.add_argument("--eval-every", type=int, help="validation loss every N steps, what ASHA compares "
                   "(default steps/10)")
    p.add_argument("--space", nargs="*", metavar="NAME=SPEC", help="lr=1e-4:1e-1:log (log-uniform), gamma=0.9:1 "
                   "(uniform), budget=32,64,128 (choice), eps=0.1 (fixed); names: lr, eps, gamma, budget, memory, "
                   "mu, directions, weight_decay, batch_size. Defaults: cocd lr, eps, gamma; bccd lr, eps; "
                   "spsa/zosgd/mezo/cge lr, mu")
    p.add_argument("--try", dest="tries", nargs="*", metavar="NAME=V,NAME=V", help="settings tried first, before "
                   "the searcher's (e.g. your hand-tuned lr=0.01,eps=0.1,gamma=0.99): they count among --trials")
    p.add_argument("--concurrent", type=int, default=1, help="trials at once (each gets cores/concurrent threads)")
    p.add_argument("--threads", type=int, help="onnxruntime threads per trial (default: cores / --concurrent)")
    p.add_argument("--grace-steps", type=int, help="ASHA: no trial is stopped before this step (default 2 evals)")
    p.add_argument("--time-budget-min", type=float, help="end the tune after this many minutes (running trials "
                   "stop where they are)")
    p.add_argument("--memory-limit-mb", type=float, help="keep every trial within this memory (the planner "
                   "chooses batch size and engine chunk)")
    p.add_argument("--address", help="an existing Ray cluster (default: a local Ray started here)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted tune in DIR with its own settings")
    p.add_argument("--out", help="the tune folder to create")
    p.set_defaults(func=lambda args: tune_run(settings_from_args(args), log=lambda s: print(s, flush=True)))
    return p
