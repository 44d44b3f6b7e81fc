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


def anonymous_bytes() -> int | None:
    """Anonymous (heap) memory: RSS without file and shared-memory pages such as Ray's object
    store mapping, which the object store, not this process, decides to release."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
