"""Facts about the current process that replicas report for operations and tests."""

from __future__ import annotations

import psutil


def rss_bytes() -> int:
    """Resident set size now."""
    return int(psutil.Process().memory_info().rss)
