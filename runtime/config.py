"""The one run config: every setting of `edgezo train` as a dataclass field. The CLI builds its flags, defaults,
choices and help from these fields; the Python API (`run.train(..., lr=0.05)` or `run.train(config=...)`) takes
the same names. Optimizer hyperparameters default to None, "not given": each optimizer takes the ones it uses
(TAKES) with their defaults (HYPER), and a given one that it does not use is refused with one line."""
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from .errors import EdgezoError, check

OPTIMIZERS = ("cocd", "bccd", "spsa", "zosgd", "mezo", "cge")
HYPER = {"lr": 1e-3, "eps": 1e-2, "budget": 64, "memory": None, "gamma": 1.0, "weight_decay": 0.0,
         "one_sided": False, "mu": 1e-3, "directions": 1}
_DIRECTIONAL = ("lr", "mu", "directions", "weight_decay")
TAKES = {"cocd": ("lr", "eps", "budget", "memory", "gamma", "weight_decay", "one_sided"),
         "bccd": ("lr", "eps", "budget", "memory", "weight_decay", "one_sided"),
         "spsa": _DIRECTIONAL, "mezo": _DIRECTIONAL, "zosgd": _DIRECTIONAL,
         "cge": ("lr", "mu", "budget", "weight_decay")}
PATHS = ("artifact", "data", "val_data")
VERSION = 2  # config.json: 1 (no "config_version"): every flag written, the ones an optimizer ignored included


def _flag(help, **kw):
    if "factory" in kw:
        return field(default_factory=kw.pop("factory"), metadata=dict(help=help, **kw))
    return field(default=kw.pop("default", None), metadata=dict(help=help, **kw))


@dataclass
class RunConfig:
    artifact: str = _flag("artifact folder (from edgezo export / export-onnx)", positional=True)
    data: str = _flag(".npz/.npy/.csv/.mat/IDX/CIFAR-10 training data")
    val_data: str = _flag("validation data, same formats")
    val_fraction: float = _flag("hold out this fraction of --data for validation")
    target_columns: int = _flag("for .csv data: how many last columns are targets")
    out: str = _flag("run folder to create (metrics.json, params.npy, trained.onnx)")
    optimizer: str = _flag("cocd; bccd (cocd with gamma 0); spsa, zosgd, mezo (direction probes: --directions, "
                           "--mu); cge (DeepZero coordinate estimate: --budget, --mu)", default="cocd",
                           choices=OPTIMIZERS)
    lr: float = _flag(f"learning rate (default {HYPER['lr']})")
    eps: float = _flag(f"cocd/bccd: finite-difference radius (default {HYPER['eps']})")
    budget: int = _flag(f"cocd/bccd/cge: B, coordinates refreshed per step, 2B evaluations (default "
                        f"{HYPER['budget']})")
    memory: str = _flag("cocd/bccd: m, gradient buffer size, a count or a fraction of n in (0, 1] (default n)")
    gamma: float = _flag("cocd: buffer decay in [0, 1]; 0 is BCCD (default 1.0)")
    weight_decay: float = _flag("decoupled weight decay (default 0)")
    one_sided: bool = _flag("cocd/bccd: one-sided differences (B+1 evaluations a step)", flag=True)
    directions: int = _flag("spsa/zosgd/mezo: directions per step (default 1)")
    mu: float = _flag(f"spsa/zosgd/mezo/cge: perturbation size (default {HYPER['mu']})")
    batch_size: int = _flag("rows per step", default=64)
    epochs: int = _flag("passes over --data", default=1)
    steps: int = _flag("stop after this many batches (epochs as needed; replaces --epochs)")
    max_seconds: float = _flag("stop once the training loop has run this long (evaluations not counted), after the "
                               "step under way")
    eval_every: int = _flag("with validation data: its loss every N batches (at 0 and the last too), in "
                            "metrics.json's evals")
    seed: int = _flag("data order, validation split and direction seeds", default=0)
    device: str = _flag("where onnxruntime runs; cuda fails clearly unless its provider is really active",
                        default="auto", choices=("auto", "cpu", "cuda"))
    threads: int = _flag("onnxruntime threads (fixed, so results do not depend on the machine's load): a call's "
                         "intra-op threads, and how many of the engine's per-probe calls run side by side", default=2)
    backend: str = _flag("onnxruntime (loss.onnx, torch-free) or executorch (model.pte; its runtime needs torch)",
                         default="onnxruntime", choices=("onnxruntime", "executorch"))
    engine: str = _flag("how a probe's losses are evaluated: auto (fastest exact path: prefix reuse and delta "
                        "propagation), batched (prefix reuse, copies batched), naive (one runtime call per point)",
                        default="auto", choices=("auto", "batched", "naive"))
    engine_memory_mb: float = _flag("cap on the engine's extra activation memory per chunk of copies", default=256)
    lean_memory: bool = _flag("return freed activations to the OS at once (glibc): a lower peak RSS (ResNet-20 "
                              "engine at batch 128: 121 vs 228 MiB rise) for some speed (the MNIST CNN engine: 2x "
                              "slower)", default=False, flag=True)
    checkpoint_every: int = _flag("write RUN/checkpoint.npz atomically every N steps")
    divergence_factor: float = _flag("a mean probe loss above this times the best so far counts as divergence",
                                     default=1e3)
    on_divergence: str = _flag("what to do on a non-finite or diverging loss", default="rollback",
                               choices=("stop", "rollback", "halve-lr"))
    fingerprint: str = field(default=None, metadata=dict(internal=True))  # sha256 of the artifact, set at start

    def check(self):
        """One-line errors for settings that cannot run; nothing is changed."""
        check(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        ignored = [k for k in HYPER if k not in TAKES[self.optimizer] and getattr(self, k) not in (None, False)]
        if ignored:
            flag = "--" + ignored[0].replace("_", "-")
            why = " (bccd is cocd with gamma 0: use --optimizer cocd --gamma G)" if ignored[0] == "gamma" else ""
            raise EdgezoError(f"{flag} does not apply to --optimizer {self.optimizer}{why}; it takes "
                              f"{', '.join('--' + k.replace('_', '-') for k in TAKES[self.optimizer])}")
        check(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        check(self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        check(self.max_seconds is None or self.max_seconds > 0, f"--max-seconds must be > 0, got {self.max_seconds}")
        check(self.eval_every is None or self.eval_every >= 1, f"--eval-every must be >= 1 batches, got "
              f"{self.eval_every}")
        check(self.eval_every is None or self.val_data or self.val_fraction,
              "--eval-every needs validation data (--val-data or --val-fraction)")
        check(self.checkpoint_every is None or self.checkpoint_every >= 1,
              f"--checkpoint-every must be >= 1 steps, got {self.checkpoint_every}")
        return self

    def argv(self):
        """The `edgezo train` command-line arguments that give this config (settings left at defaults omitted)."""
        out = [self.artifact] if self.artifact else []
        for name, kw, positional in flags(type(self)):
            value = getattr(self, name)
            if positional or value == kw["default"]:
                continue
            flag = "--" + name.replace("_", "-")
            out += [flag] if kw.get("action") == "store_true" else [flag, repr(value) if isinstance(value, float)
                                                                     else str(value)]
        return out

    def hyper(self):
        """The optimizer's hyperparameters: given values, else the defaults (HYPER), for those it takes."""
        return {k: HYPER[k] if getattr(self, k) is None else getattr(self, k) for k in TAKES[self.optimizer]}

    def to_json(self):
        return dict(asdict(self), config_version=VERSION)

    @classmethod
    def from_json(cls, saved):
        """A config.json's settings. Version 1 wrote every flag: the ones its optimizer ignored are dropped (that
        run ignored them too), so an old run resumes as it ran."""
        names = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in saved.items() if k in names})
        if saved.get("config_version", 1) == 1:
            config = replace(config, **{k: None for k in HYPER if k not in TAKES[config.optimizer]})
        return config


def flags(config_class=RunConfig):
    """(name, argparse keyword arguments, positional) per settable field: what the CLI adds for each."""
    for f in fields(config_class):
        meta = f.metadata
        if meta.get("internal"):
            continue
        kw = {"help": meta["help"], "default": f.default_factory() if f.default is MISSING else f.default}
        if meta.get("flag"):
            kw["action"] = "store_true"
        else:
            kinds = {"float": float, "int": int, "list": str}
            kw["type"] = kinds.get(getattr(f.type, "__name__", f.type), str)
            kw.update({k: meta[k] for k in ("choices", "nargs", "metavar") if k in meta})
        if meta.get("positional"):
            kw["nargs"] = "?"
        yield f.name, kw, bool(meta.get("positional"))


def add_flags(parser, config_class=RunConfig, skip=()):
    for name, kw, positional in flags(config_class):
        if name not in skip:
            parser.add_argument(name if positional else "--" + name.replace("_", "-"), **kw)


def from_namespace(args, config_class=RunConfig):
    """The config of parsed CLI arguments (the fields only)."""
    return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class) if hasattr(args, f.name)})


FLEET_PARTITIONS = ("iid", "classes")
FLEET_SKIP = ("val_fraction", "epochs", "max_seconds", "backend", "on_divergence", "divergence_factor", "lean_memory")


@dataclass
class FleetConfig(RunConfig):
    """`edgezo fleet`: a run's settings (the optimizer's, the batch per device, the steps) and the fleet's own. The
    fields in FLEET_SKIP do not apply to a fleet and get no flag. In a deployment each device's artifact and data
    are its own (its SuperNode's --node-config artifact=... data=...)."""
    clients: int = _flag("simulate: how many devices Flower's simulation runs (deployment: how many SuperNodes to "
                         "wait for before the first step)", default=3)
    partition: str = _flag("simulate: how --data is split over the devices: iid (shuffled, equal shares) or classes "
                           "(sorted by label, each device holds its own classes)", default="iid",
                           choices=FLEET_PARTITIONS)
    min_devices: int = _flag("a step needs usable answers from at least this many devices (else the fleet stops, "
                             "its log unchanged)", default=1)
    round_timeout: float = _flag("seconds a step waits for the devices' answers; a later one is left out", default=60.0)
    resume: bool = _flag("continue the run folder --out from its log (devices catch up from it)", flag=True)

    def check(self):
        super().check()
        check(self.steps is not None, "edgezo fleet needs --steps")
        check(self.clients >= 1, f"--clients must be >= 1, got {self.clients}")
        check(1 <= self.min_devices <= self.clients, f"--min-devices must be in [1, --clients={self.clients}], got "
              f"{self.min_devices}")
        check(self.round_timeout > 0, f"--round-timeout must be > 0 seconds, got {self.round_timeout}")
        check(self.partition in FLEET_PARTITIONS, f"--partition must be one of {list(FLEET_PARTITIONS)}, got "
              f"{self.partition!r}")
        return self
