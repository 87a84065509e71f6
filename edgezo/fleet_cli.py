"""`edgezo fleet`: simulate a fleet on this machine, or make the Flower app (and its keys) for a real one."""
import json
import os
from dataclasses import replace
from pathlib import Path

from .runtime.config import FLEET_SKIP, FleetConfig, add_flags, from_namespace
from .runtime.errors import check

APP_MODULE = "edgezo_fleet_app"
PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "edgezo fleet: forward-only training over Flower (made by `edgezo fleet app`)"
license = "MIT"
dependencies = []  # edgezo[fleet] is installed on the server and on every device

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "edgezo"

[tool.flwr.app.components]
serverapp = "{module}:server_app"
clientapp = "{module}:client_app"

[tool.flwr.app.config]
fleet = {fleet}
"""


def config_from(args):
    config = from_namespace(args, FleetConfig)
    if getattr(args, "resume", False):
        from .runtime.run import RUN_CONFIG
        path = Path(args.out or "") / RUN_CONFIG
        check(args.out and path.is_file(), f"--resume needs --out RUN, a fleet run folder with {RUN_CONFIG}")
        saved = FleetConfig.from_json(json.loads(path.read_text()))
        config = replace(saved, resume=True, steps=args.steps or saved.steps)
    elif args.out:
        from .runtime.files import check_new_folder
        check_new_folder(args.out)
    check(config.out, "edgezo fleet needs --out")
    return config.check()


def cmd_simulate(args):
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower reports usage events unless told not to
    from .runtime.fleet_flower import simulate
    config = config_from(args)
    check(config.artifact and config.data, "edgezo fleet simulate needs ARTIFACT and --data")
    simulate(config, log=lambda line: print(line, flush=True))


def cmd_app(args):
    """A Flower app folder for `flwr run`: its pyproject.toml carries the fleet's settings as its run config."""
    config = config_from(args)
    app = Path(args.app)
    check(not app.exists() or not any(app.iterdir()), f"{app} exists and is not empty")
    app.mkdir(parents=True, exist_ok=True)
    fleet = json.dumps(json.dumps(replace(config, out=str(Path(config.out).resolve()),
                                          artifact=str(Path(config.artifact).resolve())).to_json()))
    (app / "pyproject.toml").write_text(PYPROJECT.format(name=app.name, module=APP_MODULE, fleet=fleet))
    (app / f"{APP_MODULE}.py").write_text("from edgezo.runtime import fleet_flower\n\n"  # Flower checks assignments
                                          "server_app = fleet_flower.server_app\nclient_app = fleet_flower.client_app\n")
    print(f"wrote {app}/pyproject.toml: run it with `flwr run {app} <superlink connection> --stream`; each "
          "SuperNode gets --node-config 'artifact=\"...\" data=\"...\"'")


def cmd_keys(args):
    from .fleet_keys import write_keys
    for path in write_keys(args.folder, args.devices, args.hosts):
        print(f"wrote {path}")


def add_parser(sub):
    fleet = sub.add_parser("fleet", help="train one model on many devices over Flower (only step numbers and loss "
                           "vectors travel)").add_subparsers(dest="fleet_command", required=True)
    for name, text in (("simulate", "Flower's simulation runtime on this machine: --clients devices, each with its "
                        "share of --data"),
                       ("app", "a Flower app folder for `flwr run` against a SuperLink with SuperNodes")):
        p = fleet.add_parser(name, help=text, description=text + ". Every RunConfig flag that applies to a fleet, "
                             "plus the fleet's own (edgezo.runtime.config.FleetConfig).")
        if name == "app":
            p.add_argument("app", help="the app folder to create")
        add_flags(p, FleetConfig, skip=FLEET_SKIP + (("resume",) if name == "app" else ()))
        p.set_defaults(func=cmd_simulate if name == "simulate" else cmd_app)
    p = fleet.add_parser("keys", help="TLS certificates (a CA, the SuperLink's) and one authentication key pair "
                         "per device, for a deployment")
    p.add_argument("folder", help="folder to write ca.crt, server.pem, server.key, device-K(.pub)")
    p.add_argument("--devices", type=int, default=3, help="how many device key pairs")
    p.add_argument("--hosts", nargs="*", default=["localhost", "127.0.0.1"],
                   help="names and addresses the SuperLink's certificate is valid for")
    p.set_defaults(func=cmd_keys)
