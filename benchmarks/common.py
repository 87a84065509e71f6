"""Shared by the benchmarks: result folder, built-in artifacts (exported once, in a subprocess so the
benchmark process itself never imports torch), JSON output."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# artifacts are made once and reused; step_speed.py's baseline run (an older commit's code) gets its own folder
ARTIFACTS = Path(os.environ.get("EDGEZO_BENCH_ARTIFACTS", RESULTS / "artifacts"))
SHARED = ROOT / ".." / "shared"


def builtin_artifact(model, seed=0):
    """The built-in model exported with weight-init seed `seed` (folder <model>, or <model>-seed<k> for k > 0)."""
    path = ARTIFACTS / (model if seed == 0 else f"{model}-seed{seed}")
    if not (path / "manifest.json").exists():
        print(f"exporting {model} to {path} ...", flush=True)
        subprocess.run([sys.executable, "-m", "edgezo.cli", "export", "--model", model, "--out", str(path),
                        "--seed", str(seed)], check=True)
    return path


def write_json(name, result, quiet=False):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1))
    if not quiet:
        print(f"wrote {path}")
    return path


def deployed_artifact(model, selection, **kwargs):
    """A deployed-architecture file (benchmarks/deployed.py) imported with export-onnx for one selection
    (head / block / all), made once in a subprocess."""
    tag = "-".join(f"{k}{v}" for k, v in sorted(kwargs.items())) or "default"
    path = ARTIFACTS / f"deployed-{model}-{tag}-{selection}"
    if not (path / "manifest.json").exists():
        print(f"exporting {model} ({tag}, {selection}) to {path} ...", flush=True)
        code = ("import sys, json; from pathlib import Path; import deployed; "
                "from edgezo.exporters.onnx_import import export_onnx; "
                "out, model, sel, kw = Path(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4]); "
                "src = out.parent / (out.name + '.onnx'); deployed.export(model, src, **kw); "
                "export_onnx(src, out, 'cross_entropy', trainable=deployed.SELECTIONS[model][sel])")
        subprocess.run([sys.executable, "-c", code, str(path), model, selection, json.dumps(kwargs)], check=True,
                       cwd=Path(__file__).parent)  # deployed.py is a benchmark model, not part of the package
    return path


def train_flags(settings):
    """`edgezo train` flags for a tune's settings ({"lr": 0.01, ...} -> ["--lr=0.01", ...])."""
    return [f"--{k.replace('_', '-')}={v!r}" for k, v in settings.items()]
