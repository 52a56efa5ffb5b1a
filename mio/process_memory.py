"""This process's resident memory (Linux procfs): what the FSDP2 loader reports and what `mio
bench packing` measures on CPU."""

from __future__ import annotations

import resource
from pathlib import Path


def rss_mb() -> float:
    """This process's resident memory now, in megabytes."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Start a new window for :func:`peak_rss_mb` (Linux >= 4.0). False where it cannot: then the
    peak is the process's since it started."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """This process's peak resident memory since :func:`reset_peak_rss`, in megabytes."""
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no procfs: the process's peak
