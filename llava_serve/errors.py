"""The error taxonomy: raised anywhere, mapped to HTTP once (`llava_serve.api.http`).

Each class carries the OpenAI error `type`, the HTTP status, and optionally the request
field (`param`) it is about, so the mapping is data, not a chain of `except` clauses.
Errors cross Ray boundaries by pickling, so every field lives in `__init__` arguments.
"""

from __future__ import annotations

import math


class LlavaServeError(Exception):
    """Base class: a failure with a precise message for the caller."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self):
        return (type(self), (self.message, self.param, self.code))

    def to_body(self) -> dict:
        """The OpenAI-style error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(LlavaServeError):
    """The request is malformed or asks for something out of range."""

    status_code = 400
    error_type = "invalid_request_error"


class RequestTooLarge(InvalidRequest):
    """The request body is over `limits.max_request_bytes`."""

    status_code = 413

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param, code or "request_too_large")


class BodyTimeout(InvalidRequest):
    """The request body arrived slower than `limits.min_body_bytes_per_s`."""

    status_code = 408

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param, code or "request_timeout")


class ContextLengthExceeded(InvalidRequest):
    """Prompt tokens plus `max_tokens` do not fit the model's context."""

    def __init__(self, message: str, param: str | None = "messages", code: str | None = None):
        super().__init__(message, param, code or "context_length_exceeded")


class ImageError(InvalidRequest):
    """An image could not be fetched, decoded or accepted under the configured limits."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param, code or "invalid_image")


class Unauthorized(LlavaServeError):
    """No API key, or not one of the server's (OpenAI's 401 body)."""

    status_code = 401
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param, code or "invalid_api_key")


class NotFound(LlavaServeError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param, code or "not_found")


class ModelNotFound(LlavaServeError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = "model", code: str | None = None):
        super().__init__(message, param, code or "model_not_found")


class Overloaded(LlavaServeError):
    """The server is at capacity; the caller should retry later."""

    status_code = 503
    error_type = "overloaded_error"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, None, "overloaded")
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (type(self), (self.message, self.retry_after_s))


class Unavailable(Overloaded):
    """The replica serving the request died or went away; a retry is routed to a live one."""

    error_type = "service_unavailable"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, retry_after_s)
        self.code = "replica_unavailable"


class EngineError(LlavaServeError):
    """A model-side failure that affects only the requests involved."""

    status_code = 500
    error_type = "server_error"


# Ray's ways of saying the actor on the other end is gone (matched by name: no Ray import here).
_RAY_DEATHS = {
    "ActorDiedError",
    "RayActorError",
    "ActorUnavailableError",
    "DeploymentUnavailableError",
    # An image's tiles live in the object store, owned by the preprocessor replica that made them;
    # if it died before the model fetched them, the request starts over on a live one.
    "ObjectLostError",
    "OwnerDiedError",
    "ObjectReconstructionFailedError",
    "ReferenceCountingAssertionError",  # the tiles were freed before the model fetched them
}


# The object store has no room for a request's tiles: the server's state, not the caller's doing.
_RAY_FULL = {"ObjectStoreFullError", "OutOfDiskError"}


def unwrap(error: BaseException) -> LlavaServeError:
    """Our typed error inside `error`, or a generic server error.

    Errors raised in another Ray Serve replica arrive wrapped (Ray's wrappers keep the
    original in `cause`); this finds ours without importing Ray.
    """
    seen: BaseException | None = error
    for _ in range(8):
        if isinstance(seen, LlavaServeError):
            return seen
        if type(seen).__name__ in _RAY_DEATHS:
            return Unavailable(f"a replica serving this request stopped ({type(seen).__name__}); retry")
        if type(seen).__name__ in _RAY_FULL:
            return Overloaded(f"the cluster's object store is full ({type(seen).__name__}); retry later")
        if type(seen).__name__ == "BackPressureError":  # a Serve queue between our deployments is full
            retry = getattr(seen, "retry_after_s", None) or 1
            return Overloaded(f"the server is at capacity ({seen}); retry later", math.ceil(retry))
        seen = getattr(seen, "cause", None) or seen.__cause__
        if seen is None:
            break
    return EngineError(f"internal error: {type(error).__name__}")
