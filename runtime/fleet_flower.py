"""`edgezo fleet` on Flower's Message API (flwr 1.42): a ServerApp drives the steps, a ClientApp on each device
wraps the torch-free runtime (fleet.Device). Each step the server sends every device {step, the means it has not
applied yet}; the device applies them, evaluates the step's probe on a local batch and answers {losses, rows}.
Nothing else travels: no weights, no data (the run folder's messages.jsonl lists each message's keys and
serialized size). At the end every device answers a hash of its params, which must equal the server's replica.

Flower recreates the ClientApp for every message (under a SuperNode, in a new process): a device keeps its
optimizer's state in its Context (Flower holds it on the device between messages) and, where the process lives on
(the simulation's Ray actors), its loaded artifact, data and optimizer in a process cache: no rebuild per step.
"""
import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid, ServerApp

from . import checkpoint
from . import data as data_mod
from .config import FleetConfig
from .errors import EdgezoError, check
from .fleet import Aggregator, Device

KEY = "edgezo"  # the one record of every message and of a device's Context state
_devices, _artifacts = {}, {}  # this process's devices and artifacts (a Ray actor keeps them across messages)


def params_hash(params):
    return hashlib.sha256(np.ascontiguousarray(params).tobytes()).hexdigest()[:16]


def config_of(context, config=None):
    """The fleet's settings: given (simulation), else the run config's `fleet` JSON (deployment, `flwr run`)."""
    if config is not None:
        return config
    check("fleet" in context.run_config, "the Flower run config has no 'fleet' entry: make the app with "
          "`edgezo fleet app`")
    return FleetConfig.from_json(json.loads(context.run_config["fleet"]))


def partition(data, part, parts, how, seed):
    """Device `part` of `parts`'s rows: iid (a seeded shuffle, equal shares) or classes (sorted by label)."""
    n = data_mod.num_rows(data)
    if how == "classes":
        labels = [v for k, v in data.items() if v.ndim == 1 and np.issubdtype(v.dtype, np.integer)]
        check(labels, "--partition classes needs integer class labels in --data")
        order = np.argsort(labels[-1], kind="stable")
    else:
        order = np.random.default_rng(seed).permutation(n)
    return data_mod.take(data, np.sort(np.array_split(order, parts)[part]))


def new_device(config, node, engine=None):
    """A device from the settings and its node config: artifact and data of its own (deployment), or its
    partition of the shared --data (simulation: partition-id, num-partitions)."""
    from . import load_artifact
    from .run import make_optimizer
    path = str(node.get("artifact", config.artifact))
    if path not in _artifacts:
        _artifacts[path] = load_artifact(path, device=config.device, threads=config.threads,
                                         engine=engine or config.engine, engine_memory_mb=config.engine_memory_mb)
    artifact = _artifacts[path]
    data = data_mod.load_data(str(node.get("data", config.data)), artifact.manifest, config.target_columns)
    part = int(node.get("partition-id", 0))
    if "data" not in node and "num-partitions" in node:
        data = partition(data, part, int(node["num-partitions"]), config.partition, config.seed)
    optimizer = make_optimizer(config, artifact.initial_params())
    return Device(artifact, optimizer, data, config.batch_size, seed=config.seed + int(node.get("seed", part)))


def device_of(context, config):
    """This node's device: the process cache's if it is at the step its Context recorded, else rebuilt from the
    Context's checkpoint (or new, at step 0, when there is none: it then catches up from the server's log)."""
    key = (context.run_id, context.node_id)
    saved = context.state.get(KEY)
    device = _devices.get(key)
    if device is None or device.step != (saved["step"] if saved else 0):
        # a Context with state but no device in this process: Flower started a process for this one message (a
        # SuperNode does, for each), where building the engine costs more than the naive path's one step
        fresh = saved is not None and device is None and config.engine == "auto"
        device = new_device(config, context.node_config, engine="naive" if fresh else None)
        if saved:
            params, state, _ = checkpoint.from_bytes(saved["checkpoint"], f"node {context.node_id}'s Context")
            device.optimizer.params[:] = params
            device.optimizer.load_state_dict(state)
        _devices[key] = device
    return device


def answer(message, context, config=None):
    """The device's side of one message: apply the means it lacks, then evaluate the step (or, on the final
    message, answer its params' hash)."""
    config = config_of(context, config)
    device = device_of(context, config)
    ask = message.content[KEY]
    step, first = int(ask["step"]), int(ask["from"])
    if device.step < first:  # its state is older than the server thinks (a lost Context): resend from its step
        return Message(RecordDict({KEY: ConfigRecord({"behind": device.step})}), reply_to=message)
    means = np.frombuffer(ask["means"], np.float32).reshape(step - first, -1) if step > first else ()
    for i, mean in enumerate(means, start=first):  # log[first:step]
        if i >= device.step:
            device.apply(i, mean)
    blob = checkpoint.to_bytes(device.optimizer.params, device.state_dict(), {})
    context.state[KEY] = ConfigRecord({"step": device.step, "checkpoint": blob})
    if bool(ask["final"]):
        reply = {"step": device.step, "params_sha256": params_hash(device.optimizer.params)}
    else:
        losses, rows = device.evaluate(step)
        reply = {"step": step, "losses": losses.astype(np.float32).tobytes(), "rows": int(rows)}
    return Message(RecordDict({KEY: ConfigRecord(reply)}), reply_to=message)


def make_client_app(config=None):
    app = ClientApp()

    @app.train()
    def step(message: Message, context: Context) -> Message:
        try:
            return answer(message, context, config)
        except EdgezoError as e:  # the device's own one-line reason, not Flower's traceback
            return Message(RecordDict({KEY: ConfigRecord({"error": str(e)})}), reply_to=message)
    return app


class Wire:
    """The server's side of the transport: sends, receives, and records every message's keys and serialized
    size (Flower's own protobuf encoding) into messages.jsonl."""

    def __init__(self, grid, path):
        self.grid, self.file = grid, open(path, "a")
        self.bytes = {"down": 0, "up": 0}

    def record(self, step, way, message):
        size = len(message_to_proto(message).SerializeToString())
        self.bytes[way] += size
        keys = sorted(message.content[KEY].keys()) if message.has_content() else ["error"]
        node = message.metadata.dst_node_id if way == "down" else message.metadata.src_node_id
        self.file.write(json.dumps({"step": step, "way": way, "node": node, "keys": keys, "bytes": size}) + "\n")

    def exchange(self, step, asks, timeout):
        """Send each node its ask; the replies that arrive within `timeout` s, by node. Polls every 20 ms
        (Grid.send_and_receive polls every 3 s over HTTP: most of a step, for small models)."""
        messages = [Message(RecordDict({KEY: ConfigRecord(ask)}), dst_node_id=node, message_type="train",
                            group_id=str(step)) for node, ask in asks.items()]
        for m in messages:
            self.record(step, "down", m)
        waiting, replies = set(self.grid.push_messages(messages)), {}
        end = time.monotonic() + timeout
        while waiting and time.monotonic() < end:
            for r in self.grid.pull_messages(waiting):
                waiting.discard(r.metadata.reply_to_message_id)
                replies[r.metadata.src_node_id] = r
                self.record(step, "up", r)
            if waiting:
                time.sleep(0.02)
        self.file.flush()
        return replies


def read_answer(reply):
    """(losses, rows), or the reason a reply is left out."""
    if reply.has_error():  # an exception in the ClientApp: Flower's reason ends with its message
        reason = re.sub(r"\x1b\[[0-9;]*m", "", reply.error.reason).rstrip("'>").split("Message: ")[-1]
        return f"device error: {reason.strip()[-200:]}"
    got = reply.content[KEY]
    if "error" in got:
        return f"device error: {got['error']}"
    if "behind" in got:
        return f"its state is at step {got['behind']}: catching up"
    return np.frombuffer(got["losses"], np.float32), got["rows"]


class ServerLog:
    """The server's checkpoint: the log of means, one float32 row per step appended to means.f32 and fsynced
    every --checkpoint-every steps (each step by default). A torn last row (a crash mid-write) is dropped on
    resume, so the log is always whole steps: devices replay it, and the server's replica from it."""

    def __init__(self, out, rows, resume):
        self.path, self.rows = Path(out) / "means.f32", rows
        log = np.zeros((0, rows), np.float32)
        if resume:
            check(self.path.is_file(), f"--resume {out}: no means.f32 in it")
            raw = np.fromfile(self.path, np.float32)
            log = raw[:raw.size // rows * rows].reshape(-1, rows)
            with open(self.path, "r+b") as f:
                f.truncate(log.nbytes)
        self.means = [m.astype(np.float64) for m in log]
        self.file = open(self.path, "ab")

    def append(self, mean, sync):
        self.file.write(np.asarray(mean, np.float32).tobytes())
        self.file.flush()
        if sync:
            os.fsync(self.file.fileno())


def wait_for_nodes(grid, wanted, least, timeout):
    """The connected nodes once `wanted` are there, or after `timeout` s if at least `least` are."""
    start = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or (time.monotonic() - start > timeout and len(nodes) >= least):
            return nodes
        if time.monotonic() - start > 4 * timeout:
            raise EdgezoError(f"{len(nodes)} devices connected after {4 * timeout:.0f} s, --min-devices is {least}")
        time.sleep(0.2)


def serve(grid, config, log=print):
    """The server's loop: the steps, the final broadcast, then params.npy, trained.onnx and metrics.json from its
    replica (the initial params told the same means). Returns metrics.json's content."""
    from . import load_artifact
    from .files import check_new_folder, save_json
    from .run import RUN_CONFIG, load_train_val, make_optimizer, optimizer_settings, write_run
    from .train import evaluate
    out = Path(config.out)
    artifact = load_artifact(config.artifact, device=config.device, threads=config.threads, engine="naive")
    replica = make_optimizer(config, artifact.initial_params())
    rows = len(replica.ask())
    replica.discard()
    if not config.resume:  # a new run never appends to another run's log
        check_new_folder(out)
        out.mkdir(parents=True, exist_ok=True)
        save_json(out / RUN_CONFIG, config.to_json())
    server_log = ServerLog(out, rows, config.resume)
    aggregator = Aggregator(rows, config.min_devices, log=server_log.means)
    for mean in aggregator.log:
        replica.ask()
        replica.tell(mean)
    val = load_train_val(config, artifact.manifest)[1] if config.val_data else None

    def validation():  # the replica's, at the training batch, named as `edgezo train` names them
        return {f"val_{k}": v for k, v in evaluate(artifact, replica.params, val, config.batch_size).items()}
    wire, known, left_out, evals = Wire(grid, out / "messages.jsonl"), {}, [], []
    if aggregator.step:
        log(f"resuming at step {aggregator.step} (devices catch up from the log)")
    start, begin, first = time.perf_counter(), aggregator.step, None
    for step in range(begin, config.steps):
        nodes = wait_for_nodes(grid, config.clients, config.min_devices, config.round_timeout)
        asks = {n: ask(step, aggregator.log, known.get(n, 0)) for n in nodes}
        replies = wire.exchange(step, asks, config.round_timeout)
        answers = {n: read_answer(replies[n]) if n in replies else
                   f"no answer within {config.round_timeout:g} s" for n in nodes}
        for n, reply in replies.items():
            got = reply.content[KEY] if reply.has_content() else {}
            known[n] = int(got["behind"]) if "behind" in got else step if "losses" in got else known.get(n, 0)
        mean, out_now = aggregator.aggregate(answers)
        if step == begin:  # the first step builds the devices (sessions, engines, data)
            first = time.perf_counter() - start
        server_log.append(mean, sync=(step + 1) % (config.checkpoint_every or 1) == 0)
        replica.ask()
        replica.tell(mean)
        left_out += [{"step": step, "node": n, "reason": why} for n, why in out_now.items()]
        for n, why in out_now.items():
            log(f"step {step}: device {n} left out: {why}")
        if val is not None and config.eval_every and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
            evals.append({"step": step + 1, "seconds": time.perf_counter() - start, **validation()})
            log(f"step {step + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in evals[-1].items() if k != "step"))
        elif (step + 1) % max(1, config.steps // 10) == 0:
            log(f"step {step + 1}/{config.steps}: mean probe loss {mean.mean():.4g}, "
                f"{len(answers) - len(out_now)}/{len(answers)} devices")
    seconds = time.perf_counter() - start
    steady = (seconds - first) / (config.steps - begin - 1) if config.steps - begin > 1 else None
    nodes, identical, mine = confirm_identical(wire, grid, config, aggregator.log, known, replica.params, log)
    metrics = {"optimizer": config.optimizer, "settings": optimizer_settings(replica), "steps": replica.steps,
               "seconds": seconds, "first_step_seconds": first, "seconds_per_step_after_first": steady,
               "devices": len(nodes), "devices_identical": identical,
               "params_sha256": mine, "left_out": left_out,
               "bytes": dict(wire.bytes, per_step_per_device={
                   way: b / max(1, config.steps * len(nodes)) for way, b in wire.bytes.items()}),
               "fleet": {k: getattr(config, k) for k in ("clients", "partition", "min_devices", "round_timeout")}}
    if val is not None:
        metrics["evals"] = evals or [{"step": replica.steps, **validation()}]
    return write_run(out, config.artifact, config.batch_size, 0, config.seed, artifact.file("inference"),
                     artifact.manifest, replica.params, metrics, log)


def confirm_identical(wire, grid, config, log_of_means, known, params, log):
    """The final message: every device applies the means it lacks and answers its params' hash, which must be
    the server replica's. Returns (nodes, how many answered the same hash, that hash)."""
    nodes = sorted(grid.get_node_ids())
    replies = wire.exchange(config.steps, {n: ask(config.steps, log_of_means, known.get(n, 0), final=True)
                                           for n in nodes}, config.round_timeout)
    mine = params_hash(params)
    hashes = {n: r.content[KEY].get("params_sha256") for n, r in replies.items() if r.has_content()}
    check(all(h == mine for h in hashes.values()), f"devices' params differ from the server's replica: {hashes} vs "
          f"{mine}")
    log(f"{len(hashes)} of {len(nodes)} devices hold params identical to the server's replica ({mine})")
    return nodes, len(hashes), mine


def ask(step, log, first, final=False):
    """A step's message to a device that has applied the means before `first`."""
    means = np.asarray(log[first:step], np.float32).tobytes()
    return {"step": step, "from": first, "means": means, "final": final}


def make_server_app(config=None, log=print, result=None):
    """result: a dict that receives "metrics" or "error" (run_simulation logs a ServerApp's exception only)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            metrics = serve(grid, config_of(context, config), log)
            if result is not None:
                result["metrics"] = metrics
        except Exception as e:
            if result is None:
                raise
            result["error"] = e
    return app


client_app = make_client_app()  # for `flwr run` (deployment): the settings come from the run config
server_app = make_server_app()


def simulate(config, log=print):
    """Flower's simulation runtime on this machine: config.clients devices, each with its share of config.data
    (config.partition), in Ray actors of one CPU each. Returns metrics.json's content."""
    from flwr.simulation import run_simulation
    from .files import check_new_folder
    config.check()
    if not config.resume:  # before Ray starts: one line, nothing written
        check_new_folder(config.out)
    result = {}
    run_simulation(make_server_app(config, log, result), make_client_app(config), num_supernodes=config.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"include_dashboard": False, "log_to_driver": True}})
    if "error" in result:
        raise result["error"]
    check("metrics" in result, "the fleet's simulation ended without a result (see Flower's log above)")
    return result["metrics"]
