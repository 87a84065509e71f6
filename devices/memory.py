"""Process memory probes from /proc (Linux, Jetson included). No torch."""


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
