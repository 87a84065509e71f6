"""edgezo: forward-only training of exported models (CoCD and zeroth-order baselines)."""
from .runtime import BCCD, CoCD, EdgezoError, load_artifact

__all__ = ["CoCD", "BCCD", "EdgezoError", "load_artifact"]
