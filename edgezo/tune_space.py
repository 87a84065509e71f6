"""Search spaces for `edgezo tune`: `--space lr=1e-4:1e-1:log eps=0.01:1 budget=32,64,128 gamma=0.95`.

A range `LO:HI` is uniform, `LO:HI:log` log-uniform (integers for integer settings), `A,B,C` a choice, one value
fixes the setting. Names are RunConfig fields the optimizer takes (config.TAKES) or batch_size. Defaults per
optimizer: DEFAULT_SPACES. No Ray here: `to_ray` turns a parsed space into Ray Tune's sampling objects."""
from dataclasses import dataclass, fields

from .runtime.config import TAKES, RunConfig
from .runtime.errors import EdgezoError, check

_LR = "1e-4:1e-1:log"
DEFAULT_SPACES = {
    "cocd": {"lr": _LR, "eps": "1e-3:1:log", "gamma": "0.8:1"},
    "bccd": {"lr": _LR, "eps": "1e-4:1:log"},
    "spsa": {"lr": "1e-5:1e-1:log", "mu": "1e-4:1e-1:log"},
    "zosgd": {"lr": "1e-5:1e-1:log", "mu": "1e-4:1e-1:log"},
    "mezo": {"lr": "1e-5:1e-1:log", "mu": "1e-4:1e-1:log"},
    "cge": {"lr": _LR, "mu": "1e-4:1e-1:log"},
}
_TYPES = {f.name: f.type for f in fields(RunConfig)}
_INTS = {"budget", "directions", "batch_size"}


@dataclass(frozen=True)
class Dimension:
    name: str
    kind: str            # "range", "choice" or "fixed"
    values: tuple        # (lo, hi) for a range, the options for a choice, (value,) when fixed
    log: bool = False

    def upper(self):
        """The largest value this dimension can take (for memory planning)."""
        return max(self.values)


def _number(name, text):
    try:
        value = float(text)
    except ValueError:
        raise EdgezoError(f"--space {name}: {text!r} is not a number") from None
    if name in _INTS or (name == "memory" and value > 1):  # memory: a count above 1, else a fraction of n
        check(value == int(value), f"--space {name}: {text!r} must be an integer")
        return int(value)
    return value


def parse_dimension(name, text):
    check(name in _TYPES and (name in TAKES_ANY or name == "batch_size"),
          f"--space: {name!r} is not a tunable setting (one of {sorted(TAKES_ANY | {'batch_size'})})")
    parts = text.split(":")
    if len(parts) > 1:
        check(len(parts) == 2 or (len(parts) == 3 and parts[2] == "log"),
              f"--space {name}={text}: a range is LO:HI or LO:HI:log")
        lo, hi = _number(name, parts[0]), _number(name, parts[1])
        check(lo < hi, f"--space {name}={text}: LO must be below HI")
        log = len(parts) == 3
        check(not log or lo > 0, f"--space {name}={text}: a log range needs LO > 0")
        return Dimension(name, "range", (lo, hi), log)
    values = tuple(_number(name, v) for v in text.split(","))
    return Dimension(name, "choice" if len(values) > 1 else "fixed", values)


TAKES_ANY = {k for names in TAKES.values() for k in names} - {"one_sided"}


def parse_space(optimizer, given=()):
    """{name: Dimension}: the optimizer's default space, with `given` ("name=spec" strings) added or replacing."""
    specs = dict(DEFAULT_SPACES[optimizer])
    for item in given:
        check("=" in item, f"--space: {item!r} is not NAME=SPEC (e.g. lr=1e-4:1e-1:log)")
        name, spec = item.split("=", 1)
        specs[name.strip().replace("-", "_")] = spec.strip()
    space = {name: parse_dimension(name, spec) for name, spec in specs.items()}
    wrong = [n for n in space if n != "batch_size" and n not in TAKES[optimizer]]
    check(not wrong, f"--space {wrong[0] if wrong else ''}: --optimizer {optimizer} does not take it; it takes "
          f"{', '.join(k for k in TAKES[optimizer] if k != 'one_sided')}")
    return space


def parse_tries(space, given=()):
    """Settings tried before the searcher proposes any (`--try lr=0.01,eps=0.1,gamma=0.99`, e.g. hand-tuned
    ones): each names every searched setting with a value inside its range or among its choices."""
    searched = {n: d for n, d in space.items() if d.kind != "fixed"}
    tries = []
    for item in given:
        pairs = [p.split("=", 1) for p in item.split(",") if p]
        check(all(len(p) == 2 for p in pairs), f"--try {item!r}: give NAME=VALUE,NAME=VALUE (e.g. lr=0.01,eps=0.1)")
        point = {}
        for name, text in pairs:
            name = name.strip().replace("-", "_")
            check(name in searched, f"--try {item!r}: {name!r} is not searched (searched: {', '.join(searched)})")
            value, d = _number(name, text), searched[name]
            inside = value in d.values if d.kind == "choice" else d.values[0] <= value <= d.values[1]
            check(inside, f"--try {item!r}: {name}={text} is outside --space {name} ({describe({name: d})})")
            point[name] = value
        missing = sorted(set(searched) - set(point))
        check(not missing, f"--try {item!r}: give {', '.join(missing)} too (every searched setting)")
        tries.append(point)
    return tries


def to_ray(space):
    """The Ray Tune param_space of a parsed space."""
    from ray import tune
    out = {}
    for d in space.values():
        if d.kind == "fixed":
            out[d.name] = d.values[0]
        elif d.kind == "choice":
            out[d.name] = tune.choice(list(d.values))
        elif d.name in _INTS:  # integer ranges: upper bound inclusive here, exclusive in Ray
            out[d.name] = (tune.lograndint if d.log else tune.randint)(d.values[0], d.values[1] + 1)
        else:
            out[d.name] = (tune.loguniform if d.log else tune.uniform)(*d.values)
    return out


def describe(space):
    return ", ".join(f"{d.name} {'log ' if d.log else ''}{d.values[0]:g}..{d.values[1]:g}" if d.kind == "range"
                     else f"{d.name} in {list(d.values)}" if d.kind == "choice" else f"{d.name}={d.values[0]}"
                     for d in space.values())
