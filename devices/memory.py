"""Process memory probes (they live in runtime/memory.py, which the device-side loop uses; re-exported here)."""
from ..runtime.memory import peak_rss_mb, return_freed_memory, rss_mb  # noqa: F401
