"""Refusing excess work at the door, before any image is fetched or prompt tokenized."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from llava_serve.config import AdmissionConfig
from llava_serve.errors import Overloaded


class Admission:
    """Counts the requests one ingress replica (or one Serve proxy, `http.EdgeAdmission`) works
    on; past the limit, an immediate 503 naming `knob`, the setting that limit comes from.

    The count covers a request from before its body is parsed until its last byte is sent,
    so a refusal costs next to nothing and an admitted request keeps its slot while it streams.
    """

    def __init__(self, config: AdmissionConfig, knob: str = "admission.max_inflight_requests"):
        self.knob = knob
        self.configure(config)
        self.inflight = 0
        self.receiving = 0  # bodies still arriving, which hold no slot
        self.draining = False

    def configure(self, config: AdmissionConfig) -> None:
        """New limits, for the next request; the counts carry on."""
        self.limit = config.max_inflight_requests
        self.retry_after_s = config.retry_after_s
        self.max_receiving = config.max_receiving

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
                f"{self.limit}, {self.knob}); retry later",
                self.retry_after_s,
            )
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1

    @contextlib.contextmanager
    def receiving_body(self) -> Iterator[None]:
        """Count a body that is still arriving, or raise `Overloaded` at once past `max_receiving`."""
        if self.max_receiving and self.receiving >= self.max_receiving:
            raise Overloaded(
                f"the server is receiving {self.receiving} request bodies, its limit; retry later",
                self.retry_after_s,
            )
        self.receiving += 1
        try:
            yield
        finally:
            self.receiving -= 1

    def take(self) -> Slot:
        """A slot for one request (`Overloaded` at once if there is none), which it gives back
        with `Slot.release`."""
        self.enter()
        return Slot(self)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        slot = self.take()
        try:
            yield
        finally:
            slot.release()


class Slot:
    """One request's in-flight slot: given back at most once, and lent back while its body is
    still arriving."""

    def __init__(self, admission: Admission):
        self._admission, self.held = admission, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._admission.leave()

    def hold(self) -> None:
        """Count the request again without checking the limit: it was admitted already."""
        if not self.held:
            self.held = True
            self._admission.inflight += 1

    @contextlib.contextmanager
    def lent(self) -> Iterator[None]:
        """While a body trickles in: the slot is given back (so slow uploads cannot keep a quick
        request out) and the body counted among those being received (`Overloaded` past
        `max_receiving`); once it is in, the slot is taken again (`Overloaded` if it has gone).
        On an error inside, the slot stays given back."""
        self.release()
        with self._admission.receiving_body():
            yield
        self._admission.enter()
        self.held = True
