"""Refusing excess work at the door, before any image is fetched or prompt tokenized."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from llava_serve.config import AdmissionConfig
from llava_serve.errors import Overloaded


class Admission:
    """Counts the requests one ingress replica works on; past the limit, an immediate 503.

    The count covers a request from before its body is parsed until its last byte is sent,
    so a refusal costs next to nothing and an admitted request keeps its slot while it streams.
    """

    def __init__(self, config: AdmissionConfig):
        self.limit = config.max_inflight_requests
        self.retry_after_s = config.retry_after_s
        self.inflight = 0
        self.draining = False

    def drain(self) -> None:
        """From now on every new request is refused: the server is going away."""
        self.draining = True

    def enter(self) -> None:
        """Take a slot, or raise `Overloaded` at once."""
        if self.draining:
            raise Overloaded("the server is shutting down; retry against another one", self.retry_after_s)
        if self.limit and self.inflight >= self.limit:
            raise Overloaded(
                f"the server is at capacity ({self.inflight} requests in flight, the limit is "
                f"{self.limit}); retry later",
                self.retry_after_s,
            )
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()
