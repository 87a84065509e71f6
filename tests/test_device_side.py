"""The device side (runtime/, devices/) imports no torch and stays valid Python 3.10."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_no_torch_import_in_device_code():
    for folder in ("runtime", "devices"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                assert not any(n.split(".")[0] == "torch" for n in names), f"{path} imports torch"


def test_runtime_imports_with_torch_blocked():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import edgezo, edgezo.runtime.train, edgezo.runtime.data, edgezo.devices.memory, edgezo.exporters\n"
            "print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


def test_python_310_compatible():
    vermin = Path(sys.executable).with_name("vermin")
    proc = subprocess.run([str(vermin), "-t=3.10-", "--violations", "--no-tips",
                           "--eval-annotations", str(ROOT / "runtime"), str(ROOT / "devices")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_runtime_imports_nothing_above_it():
    """runtime/ is the bottom layer: it imports neither the edgezo/ package above it (the ExecuTorch backend
    registers itself from there) nor devices/ (which imports runtime/: no circle)."""
    for path in (ROOT / "runtime").rglob("*.py"):
        depth = len(path.relative_to(ROOT / "runtime").parts) - 1  # runtime/engine/x.py may reach runtime/
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 + depth, f"{path}: from {'.' * node.level}{node.module} reaches above runtime/"
                assert not (node.level == 0 and (node.module or "").startswith("edgezo")), f"{path}: {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("edgezo") for a in node.names), f"{path} imports the edgezo package"
