"""What `edgezo tune` leaves: a table of the best trials, DIR/tune.json (every trial's settings and curve),
DIR/best.json (with the command that reproduces the best trial) and DIR/tune.png."""
import math
from pathlib import Path

from .tune_space import describe


def _status(result, last, steps):
    if result.error is not None:
        return "error"
    if last.get("diverged"):
        return "diverged"
    return "finished" if last.get("step", 0) >= steps else "stopped early"


def collect(results, steps):
    """One dict per trial: id, status, tuned settings, curve [(step, val_loss)], final loss (None if none)."""
    trials = []
    for result in results:
        last = result.metrics or {}
        frame = result.metrics_dataframe
        curve = [] if frame is None or "val_loss" not in frame else [
            {"step": int(s), "val_loss": float(v)} for s, v in zip(frame["step"], frame["val_loss"])]
        if last.get("diverged") and curve:
            curve = curve[:-1]  # the penalty report repeats the last step with the worst loss
        trials.append({"trial_id": last.get("trial_id") or Path(result.path).name, "status": _status(result, last, steps),
                       "settings": dict(result.config or {}), "val_loss": last.get("val_loss"),
                       "val_accuracy": last.get("val_accuracy"), "step": last.get("step"), "curve": curve,
                       "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"[:500]})
    # a loss at an earlier step does not compare with one after every step: trials that ran them all rank first
    return sorted(trials, key=lambda t: (t["status"] != "finished",
                                         t["val_loss"] is None or not math.isfinite(t["val_loss"]),
                                         t["val_loss"] if t["val_loss"] is not None else 0.0))


def _fmt(settings):
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def table(trials, rows=5):
    lines = [f"{'rank':>4}  {'trial':<10} {'val loss':>10} {'step':>6}  {'status':<13} settings"]
    for i, t in enumerate(trials[:rows], 1):
        loss = "-" if t["val_loss"] is None else f"{t['val_loss']:.5g}"
        lines.append(f"{i:>4}  {t['trial_id']:<10} {loss:>10} {t['step'] or 0:>6}  {t['status']:<13} "
                     f"{_fmt(t['settings'])}")
    return "\n".join(lines)


def plot(trials, space, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    names = [n for n, d in space.items() if d.kind != "fixed"]
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(5 + 3.5 * len(names), 4), squeeze=False)
    ax = axes[0][0]
    for t in reversed(trials):
        if t["curve"]:
            best = t is trials[0]
            ax.plot([p["step"] for p in t["curve"]], [p["val_loss"] for p in t["curve"]],
                    color="C3" if best else "0.6", lw=2.2 if best else 0.8, zorder=3 if best else 1,
                    label=f"best ({t['trial_id']})" if best else None)
    ax.set(xlabel="step", ylabel="validation loss", title="trials (ASHA stops poor ones early)")
    done = [t for t in trials if t["val_loss"] is not None]
    losses = [p["val_loss"] for t in done for p in t["curve"]] or [1.0]
    yscale = "log" if min(losses) > 0 and max(losses) > 10 * min(losses) else "linear"  # log only when it helps
    ax.set_yscale(yscale)
    if trials[0]["curve"]:
        ax.legend()
    for ax, name in zip(axes[0][1:], names):
        xs = [t["settings"].get(name) for t in done]
        ax.scatter(xs, [t["val_loss"] for t in done], c=["C3" if t is trials[0] else "C0" for t in done], s=18)
        ax.set(xlabel=name, ylabel="last validation loss", yscale=yscale)
        if space[name].log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out, settings, space, trials, seconds, log):
    from .runtime.files import save_json
    from .tune import command
    best = trials[0]
    reproduce = command(settings, best["settings"], out / "best_run", steps=best["step"])
    finished = sum(t["status"] != "error" for t in trials)
    summary = {"optimizer": settings.base["optimizer"], "artifact": settings.base["artifact"],
               "space": describe(space), "steps": settings.steps, "eval_every": settings.eval_every,
               "concurrent": settings.concurrent, "threads_per_trial": settings.base["threads"],
               "seconds": seconds, "trials_per_minute": 60 * len(trials) / seconds if seconds else None,
               "trials_done": len(trials), "trials_ok": finished, "trials": trials}
    best_json = {"trial_id": best["trial_id"], "settings": best["settings"], "val_loss": best["val_loss"],
                 "val_accuracy": best["val_accuracy"], "step": best["step"], "command": reproduce}
    save_json(out / "tune.json", summary)
    save_json(out / "best.json", best_json)
    plot(trials, space, out / "tune.png")
    log(table(trials))
    log(f"{len(trials)} trials in {seconds:.0f} s ({summary['trials_per_minute']:.2f} per minute); best val loss "
        f"{best['val_loss']:.6g} ({best['trial_id']}: {_fmt(best['settings'])})")
    log(f"reproduce it: {reproduce}")
    log(f"wrote {out}/tune.json, best.json, tune.png")
    return best_json
