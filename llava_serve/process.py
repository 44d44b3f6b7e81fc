"""Facts about the current process that replicas report for operations and tests."""

from __future__ import annotations

import os
import resource


def rss_bytes() -> int:
    """Resident set size now (Linux `/proc`), else the peak as `getrusage` reports it."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
