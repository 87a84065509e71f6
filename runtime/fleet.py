"""A fleet training one model forward-only: every device evaluates the same probe on its own data, the server
takes the sample-weighted mean of the devices' loss vectors, and every device tells its optimizer that same mean,
so all devices keep identical params. Only step numbers, loss vectors and sample counts travel: 2B floats up and
down per step, whatever the model's size. No torch and no Flower here (fleet_flower.py carries these over
Flower's Message API); the server keeps the log of means, from which a device that missed steps catches up exactly.
Means travel as float32 (the losses' own precision): the log holds exactly what the devices were told.
"""
import numpy as np

from . import data as data_mod
from .errors import EdgezoError, check
from .train import split_batch


class Device:
    """One device: its artifact, its optimizer (same kind, settings and initial params on every device) and its
    own data, read in its own order (data.epoch_order with `seed`)."""

    def __init__(self, artifact, optimizer, data, batch_size, seed=0):
        self.artifact, self.optimizer, self.data, self.batch_size, self.seed = artifact, optimizer, data, batch_size, seed
        self.rows = data_mod.num_rows(data)
        data_mod.check_batch_size(batch_size, self.rows)
        self.per_epoch = data_mod.batches_per_epoch(self.rows, batch_size)
        self._asked = None  # (step, probe) asked and not yet told

    @property
    def step(self):
        return self.optimizer.steps

    def batch(self, step):
        epoch, b = divmod(step, self.per_epoch)
        order = data_mod.epoch_order(self.rows, self.seed, epoch)
        return data_mod.take(self.data, order[b * self.batch_size:(b + 1) * self.batch_size])

    def _probe(self, step):
        check(step == self.step, f"the fleet is at step {step}, this device at {self.step}: catch up first")
        if self._asked is None or self._asked[0] != step:
            self._asked = (step, self.optimizer.ask())
        return self._asked[1]

    def state_dict(self):
        """The optimizer's state without a pending probe: restored, it asks the same probe again. A pending one is
        discarded first (discard() undoes what ask() drew, a directional optimizer's seeds); the next evaluate or
        apply asks it again, identically."""
        if self._asked is not None:
            self.optimizer.discard()
            self._asked = None
        return self.optimizer.state_dict()

    def evaluate(self, step):
        """(this step's loss vector on a local batch, the batch's row count)."""
        probe = self._probe(step)
        inputs, targets = split_batch(self.artifact, self.batch(step))
        losses = self.artifact.losses(self.optimizer.params, probe, inputs, targets)
        return np.asarray(losses, np.float64), data_mod.num_rows(inputs)

    def apply(self, step, mean):
        """Tell the fleet's mean for `step` (evaluated here or not: the probe follows from the optimizer's state)."""
        self._probe(step)
        self.optimizer.tell(mean)
        self._asked = None

    def catch_up(self, log):
        """Replay the server's means from this device's step on: it ends where the others are, bit for bit."""
        for step in range(self.step, len(log)):
            self.apply(step, log[step])


class Aggregator:
    """The server's side: checks each device's answer, averages the valid ones by sample count, keeps the log."""

    def __init__(self, probe_rows, min_devices=1, log=None):
        check(min_devices >= 1, f"--min-devices must be >= 1, got {min_devices}")
        self.probe_rows, self.min_devices = probe_rows, min_devices
        self.log = [] if log is None else [np.asarray(v, np.float64) for v in log]

    @property
    def step(self):
        return len(self.log)

    def problem(self, answer):
        """None for a usable answer (losses, count), else why it is left out."""
        if isinstance(answer, (str, BaseException)):
            return str(answer) or type(answer).__name__
        losses, count = answer
        losses = np.asarray(losses, np.float64)
        if losses.shape != (self.probe_rows,):
            return f"{losses.size} losses, expected {self.probe_rows}"
        if not np.all(np.isfinite(losses)):
            return "a non-finite loss"
        if not (isinstance(count, (int, np.integer)) and count > 0):
            return f"sample count {count!r}"
        return None

    def aggregate(self, answers):
        """answers: {device: (losses, count) or an error}. Returns (mean, {device: reason left out}); the mean is
        appended to the log. Fewer valid answers than min_devices: an error, and the log is unchanged."""
        left_out = {d: why for d, a in answers.items() if (why := self.problem(a))}
        valid = {d: a for d, a in answers.items() if d not in left_out}
        if len(valid) < self.min_devices:
            raise EdgezoError(f"step {self.step}: {len(valid)} of {len(answers)} devices answered usably, "
                              f"--min-devices is {self.min_devices} ({left_out})")
        counts = np.array([a[1] for a in valid.values()], np.float64)
        stacked = np.stack([np.asarray(a[0], np.float64) for a in valid.values()])
        mean = (counts @ stacked / counts.sum()).astype(np.float32).astype(np.float64)
        self.log.append(mean)
        return mean, left_out
