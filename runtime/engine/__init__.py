"""The evaluation engine: the op registry (ops.py, ops_*.py), reading loss.onnx into ops (reader.py), the step
skeleton and paths (step.py), the CPU engine (core.py) and the device engine (device.py)."""
from .core import GraphEngine
from .device import DeviceEngine
from .graph import Unsupported
from .ops import OPS, Mode
from .step import Path, Route

__all__ = ["GraphEngine", "DeviceEngine", "Unsupported", "OPS", "Mode", "Path", "Route"]
