"""Process memory probes from /proc (Linux, Jetson included), and giving freed heap back to the OS. No torch."""
import ctypes
import functools
import time


def _status_kb(field, pid="self"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb(pid="self"):
    """The process's peak resident set (VmHWM) in MiB, or None where /proc is unavailable."""
    kb = _status_kb("VmHWM", pid)
    return None if kb is None else kb / 1024


def rss_mb(pid="self"):
    kb = _status_kb("VmRSS", pid)
    return None if kb is None else kb / 1024


def return_freed_memory():
    """glibc: serve allocations over 128 KiB with mmap and give them back to the OS when freed.

    By default glibc raises that threshold after each large free (up to 32 MiB), so freed activations
    stay in its per-thread heaps and the peak RSS grows to a multiple of the live data (the ResNet-20
    engine at batch 128: 356 vs 194 MiB). The cost is a page fault per new large array (about 20% on
    the SARCOS MLP engine). Process-wide; returns False where the C library is not glibc."""
    mallopt = getattr(_libc(), "mallopt", None)
    return bool(mallopt and mallopt(-3, 128 * 1024))  # -3: M_MMAP_THRESHOLD


def import_runtime(engine="auto"):
    """Import what training needs before a post-import baseline is read: onnxruntime, and onnx where the engine
    may cut graphs (15 MiB), and the numpy modules that numpy 2 imports on first use (numpy.random 5.6 MiB: the
    optimizers' and the engine's generators; numpy.ma 1 MiB: np.unique); a rise then counts what training holds, as
    for other runtimes after their imports."""
    import numpy.ma  # noqa: F401
    import numpy.random  # noqa: F401
    import onnxruntime  # noqa: F401
    if engine != "naive":
        import onnx  # noqa: F401


@functools.cache  # loaded once: the trimmer calls it after training steps
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_heap():
    """glibc's malloc_trim(0): the free pages inside its heaps go back to the OS (no-op elsewhere)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


class Trimmer:
    """glibc keeps the pages of freed allocations in its heaps (one per onnxruntime thread) for reuse, and sessions
    made and dropped, stacked copies and activations of varying sizes fragment them: the MobileNetV3 norms+biases
    engine held 186 MiB after 120 steps, 72 once trimmed. Calling it after each step gives those pages back with
    malloc_trim(0), at most `share` of the time (a trim took 1.7 ms there). The pages it gives back are faulted in
    again when reused, which its own timer does not see: at 2% the transformer's int8 --scales step ran 5-10% slower,
    at 0.5% no slower, and the norms+biases rise at --engine-memory-mb 64 was the same (134 vs 138 MiB)."""

    def __init__(self, share=0.005):
        self.share, self.next = share, 0.0

    def __call__(self):
        now = time.perf_counter()
        if now < self.next:
            return
        trim_heap()
        self.next = now + (time.perf_counter() - now) / self.share
