"""Python's cyclic garbage collector, kept off the heap a replica builds at startup.

A replica's process holds half a million objects once Ray, Serve, torch and transformers are
imported and the model is loaded, and a full (generation 2) collection walks every one of them:
~200 ms with the GIL held, in which no token is sampled, streamed or relayed. Collected once
after startup and frozen (`gc.freeze`), those objects leave the collector's generations, so the
collections that serving triggers walk only what serving allocated (the engine in-process at 16
streams: one 196 ms full collection in a 12 s run, none once frozen; docs/performance.md).
Frozen objects are still freed by reference counting; only cycles among them stay.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what startup left behind, then freeze every object alive."""
    gc.collect()
    gc.freeze()
