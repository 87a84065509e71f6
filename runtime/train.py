"""The training loop: ask a probe, evaluate its losses, tell them back. No torch.

`steps(artifact, optimizer, batches)` is the streaming core: any iterable of (inputs, targets)
batches (so on-device data can arrive as it is recorded), yielding one `StepResult` per step.
`fit(...)` adds epochs over an in-memory dataset, validation, progress output and callbacks.
"""
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

from . import data as data_mod
from .errors import EdgezoError


@dataclass
class StepResult:
    step: int
    loss: float          # mean of the probe's losses: f(x) up to O(eps^2) for central probes
    seconds: float
    diverged: bool = False


class DivergenceError(EdgezoError):
    """Training diverged and the guard's action is 'stop' (or it kept diverging)."""


class DivergenceGuard:
    """Catches a non-finite loss, or a mean probe loss above `factor` x the best so far.

    Before each update the optimizer state that produced finite, sane losses is kept; on divergence
    it is restored ('rollback'), restored with the learning rate halved ('halve-lr'), or training
    stops ('stop'). `max_strikes` divergences in a row stop training in any case.
    """
    ACTIONS = ("stop", "rollback", "halve-lr")

    def __init__(self, factor=1e3, action="rollback", log=print, max_strikes=10):
        if action not in self.ACTIONS:
            raise EdgezoError(f"--on-divergence must be one of {list(self.ACTIONS)}, got {action!r}")
        if not (factor is None or factor > 1):
            raise EdgezoError(f"--divergence-factor must be > 1, got {factor}")
        self.factor, self.action, self.log, self.max_strikes = factor, action, log, max_strikes
        self.best, self.strikes, self.snapshot, self.events = np.inf, 0, None, 0

    def diverged(self, losses):
        if not np.all(np.isfinite(losses)):
            return "a non-finite loss"
        mean = float(np.mean(losses))
        if self.factor is not None and np.isfinite(self.best) and mean > self.factor * max(self.best, 1e-12):
            return f"loss {mean:.4g} > {self.factor:g} x best {self.best:.4g}"
        return None

    def remember(self, optimizer, losses):
        self.best = min(self.best, float(np.mean(losses)))
        self.strikes = 0
        self.snapshot = (optimizer.params.copy(), optimizer.state_dict())

    def handle(self, optimizer, reason):
        self.strikes += 1
        self.events += 1
        if self.action == "stop" or self.snapshot is None or self.strikes > self.max_strikes:
            raise DivergenceError(f"training diverged at step {optimizer.steps + 1}: {reason}; stopped")
        params, state = self.snapshot
        optimizer.params[:] = params
        optimizer.load_state_dict(state)
        note = "rolled back to the last good state"
        if self.action == "halve-lr":  # new settings; the state stays the restored one
            optimizer.settings = replace(optimizer.settings, lr=optimizer.settings.lr / 2)
            note += f", lr halved to {optimizer.lr:.3g}"
        if self.log:
            self.log(f"divergence at step {optimizer.steps + 1} ({reason}): {note}")


def split_batch(artifact, batch):
    """(inputs, targets) from a batch given as a pair or as a dict {name: array}."""
    if isinstance(batch, dict):
        return ({n: batch[n] for n in artifact.input_names}, {n: batch[n] for n in artifact.target_names})
    inputs, targets = batch
    return inputs, targets


def steps(artifact, optimizer, batches, guard=None):
    """Train on each batch in turn; yields a StepResult after each batch (diverged=True if skipped)."""
    for batch in batches:
        inputs, targets = split_batch(artifact, batch)
        start = time.perf_counter()
        probe = optimizer.ask()
        try:
            losses = artifact.losses(optimizer.params, probe, inputs, targets)
        except BaseException:
            optimizer.discard()
            raise
        reason = guard.diverged(losses) if guard else None
        if reason:
            optimizer.discard()
            guard.handle(optimizer, reason)
            yield StepResult(optimizer.steps, float("nan"), time.perf_counter() - start, diverged=True)
            continue
        if guard:
            guard.remember(optimizer, losses)
        optimizer.tell(losses)
        yield StepResult(optimizer.steps, float(np.mean(losses)), time.perf_counter() - start)


def evaluate(artifact, params, data, batch_size=256):
    """Mean loss (and accuracy for classifiers) of params over a dataset."""
    n = data_mod.num_rows(data)
    total, correct = 0.0, 0
    for rows in range(0, n, batch_size):
        batch = data_mod.take(data, slice(rows, rows + batch_size))
        inputs, targets = split_batch(artifact, batch)
        loss, out = artifact.outputs(params, inputs, targets)
        size = len(out)
        total += loss * size
        if artifact.is_classifier:
            correct += int(np.sum(np.argmax(out, axis=-1) == targets[artifact.target_names[0]]))
    result = {"loss": total / n}
    if artifact.is_classifier:
        result["accuracy"] = correct / n
    return result


class Progress:
    """A one-line progress bar on stderr (only where stderr is a terminal, or when forced)."""

    def __init__(self, total, label, enabled=None):
        self.total, self.label = total, label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.last = 0.0

    def update(self, done, loss):
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and done < self.total):
            return
        self.last = now
        filled = int(30 * done / self.total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} "
                         f"loss {loss:.4g}")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def fit(artifact, optimizer, train_data, batch_size, epochs, seed=0, val_data=None, on_epoch=None,
        log=print, progress=None, start_epoch=0, start_batch=0, on_step=None, guard=None, max_steps=None,
        eval_every=None, on_eval=None, max_seconds=None):
    """Epochs of training over `train_data` (a dict of arrays); returns the per-epoch history.

    Row order per epoch is `data.epoch_order(n, seed, epoch)`, so a run can resume at
    (start_epoch, start_batch). `on_step(epoch, batch_index, result)` and `on_epoch(record)` are
    called after each step and epoch. `max_steps` ends training after that many batches in all (mid-epoch);
    with `eval_every` and val_data, `on_eval({"step": batches, "val_loss": ...})` is called at batch 0, every
    eval_every batches and at the last one ("seconds": the loop's wall time so far, evaluations excluded).
    `max_seconds` ends training once the loop has run that long (evaluations excluded), after the step under way.
    """
    n = data_mod.num_rows(train_data)
    data_mod.check_batch_size(batch_size, n)
    fixed = getattr(artifact, "fixed_batch", None)
    if fixed is not None and batch_size != fixed:
        raise EdgezoError(f"--batch-size must be {fixed} for this {artifact.backend} program, got {batch_size}")
    per_epoch = data_mod.batches_per_epoch(n, batch_size, drop_last=fixed is not None)
    last = min(epochs * per_epoch, max_steps or epochs * per_epoch)

    clock = {"start": time.perf_counter(), "evaluating": 0.0}

    def looped():
        return time.perf_counter() - clock["start"] - clock["evaluating"]

    def validate():
        start = time.perf_counter()
        # at the training batch: an evaluation never needs more memory than a step (at 256 rows a call the demo's
        # rise was 81 MiB with the engine, 37 naive; at its batch of 64, 48 and 24)
        val = evaluate(artifact, optimizer.params, val_data, batch_size)
        clock["evaluating"] += time.perf_counter() - start
        return val

    def check_point(done, final=False):
        if eval_every and val_data is not None and on_eval and (done % eval_every == 0 or done == last or final):
            seconds = looped()
            on_eval({"step": done, "seconds": seconds, **{f"val_{k}": v for k, v in validate().items()}})

    if start_epoch == 0 and start_batch == 0:
        check_point(0)
    history = []
    for epoch in range(start_epoch, epochs):
        if epoch * per_epoch >= last:
            break
        order = data_mod.epoch_order(n, seed, epoch)
        bar = Progress(per_epoch, f"epoch {epoch + 1}/{epochs}", progress)
        first = start_batch if epoch == start_epoch else 0
        losses, seconds = [], 0.0
        batch_iter = data_mod.batches(train_data, batch_size, order, first, drop_last=fixed is not None)
        for b, result in enumerate(steps(artifact, optimizer, batch_iter, guard), start=first):
            if not result.diverged:
                losses.append(result.loss)
            seconds += result.seconds
            bar.update(b + 1, float(np.mean(losses[-20:])) if losses else float("nan"))
            if on_step:
                on_step(epoch, b, result)
            out_of_time = max_seconds is not None and looped() >= max_seconds
            check_point(epoch * per_epoch + b + 1, final=out_of_time)
            if epoch * per_epoch + b + 1 >= last or out_of_time:
                break
        record = {"epoch": epoch + 1, "steps": optimizer.steps, "train_loss": float(np.mean(losses)) if losses
                  else float("nan"), "seconds": seconds}
        if val_data is not None:
            record.update({f"val_{k}": v for k, v in validate().items()})
        history.append(record)
        if log:
            log(format_record(record))
        if on_epoch:
            on_epoch(record)
        if max_seconds is not None and looped() >= max_seconds:
            break
    return history


def format_record(r):
    parts = [f"epoch {r['epoch']}", f"train loss {r['train_loss']:.5g}"]
    if "val_loss" in r:
        parts.append(f"val loss {r['val_loss']:.5g}")
    if "val_accuracy" in r:
        parts.append(f"val acc {100 * r['val_accuracy']:.2f}%")
    parts.append(f"{r['seconds']:.2f} s")
    return "  ".join(parts)
