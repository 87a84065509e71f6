"""edgezo.runtime: the torch-free device side (optimizers, evaluation, data, the loop)."""
from .artifact import Artifact, load_artifact
from .errors import EdgezoError
from .optim import BCCD, CoCD, CoordinateProbe, DirectionProbe

__all__ = ["Artifact", "load_artifact", "EdgezoError", "CoCD", "BCCD", "CoordinateProbe", "DirectionProbe"]
