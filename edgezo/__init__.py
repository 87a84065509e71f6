"""edgezo: forward-only training of exported models (CoCD and zeroth-order baselines)."""
from .runtime import BCCD, CoCD, EdgezoError, load_artifact
from .runtime.artifact import BACKENDS


def _executorch(path, device="auto", threads=None):  # imported on use: ExecuTorch's runtime loads torch
    from .executorch_backend import ExecutorchArtifact
    return ExecutorchArtifact(path, device=device, threads=threads)


BACKENDS["executorch"] = _executorch

__all__ = ["CoCD", "BCCD", "EdgezoError", "load_artifact"]
