"""Shared by the benchmarks: result folder, built-in artifacts (exported once, in a subprocess so the
benchmark process itself never imports torch), JSON output."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT / ".." / "shared"


def builtin_artifact(model, seed=0):
    """The built-in model exported with weight-init seed `seed` (folder <model>, or <model>-seed<k> for k > 0)."""
    path = RESULTS / "artifacts" / (model if seed == 0 else f"{model}-seed{seed}")
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
