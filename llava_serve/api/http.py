"""HTTP concerns in one place: errors to status codes and bodies, the door check in front of
the app, SSE streams, request ids.

Everything that reaches a handler here is already typed (`ChatService` unwraps errors that
crossed a Ray boundary), so FastAPI's own 500 path is left for bugs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llava_serve.api import bounds
from llava_serve.api.admission import Admission, Slot
from llava_serve.api.auth import ApiKeys, HostCheck
from llava_serve.api.chat import invalid_from_validation
from llava_serve.config import AdmissionConfig, LimitsConfig
from llava_serve.errors import (
    BodyTimeout,
    InvalidRequest,
    LlavaServeError,
    NotFound,
    Overloaded,
    RequestTooLarge,
    Unauthorized,
    unwrap,
)

logger = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"
# Where the door check applies: the routes that start generation, and those that fetch, decode or
# tokenize what the caller sends.
GUARDED_PATHS = ("/v1/chat/completions", "/v1/responses", "/tokenize", "/detokenize")
# What answers without an API key: liveness for load balancers, and the playground page (static,
# it holds nothing; its own calls carry the key the user types into it).
OPEN_PATHS = frozenset({"/health", "/"})
PUBLIC_MODEL_PATHS = frozenset({"/v1/models", "/openapi.json"})


def error_response(error: BaseException, request_id: str | None = None) -> JSONResponse:
    """The one mapping from an exception to an HTTP status and OpenAI error body."""
    typed = unwrap(error)
    if typed.status_code >= 500 and not isinstance(typed, Overloaded):  # refusals are counted, not logged
        logger.error("request %s failed: %r", request_id, error)
    body = typed.to_body()
    if request_id and typed.status_code >= 500:
        body["error"]["message"] += f" (request id {request_id})"
    headers = {"Retry-After": str(typed.retry_after_s)} if isinstance(typed, Overloaded) else {}
    return JSONResponse(body, status_code=typed.status_code, headers=headers)


async def _events(first: BaseModel, chunks: AsyncIterator[BaseModel], request_id: str | None):
    """Chunks as SSE data (dicts: sse-starlette frames them with the response's separator),
    ending with `[DONE]`; an error after the start becomes an error event."""
    yield {"data": first.model_dump_json()}
    try:
        async for chunk in chunks:
            yield {"data": chunk.model_dump_json()}
    except Exception as e:
        logger.warning("stream %s ended with error: %r", request_id, e)
        yield {"data": json.dumps(unwrap(e).to_body())}
    yield {"data": "[DONE]"}


async def event_stream(
    chunks: AsyncIterator[BaseModel], request_id: str | None, keepalive_s: float
) -> EventSourceResponse:
    """An SSE response for `chunks`. The first chunk is awaited before the response starts, so
    errors up to then still get their status code; afterwards a comment every `keepalive_s`
    keeps proxies from timing out a request that waits in a queue or in prefill."""
    first = await anext(chunks)
    return _sse(_events(first, chunks, request_id), keepalive_s)


def _sse(frames: AsyncIterator[dict], keepalive_s: float) -> EventSourceResponse:
    return EventSourceResponse(
        frames,
        ping=keepalive_s,
        sep="\n",
        # sse-starlette's default is no-store; no-cache is what OpenAI sends and what proxies expect.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _named_events(first: dict, events: AsyncIterator[dict], request_id: str | None):
    """Responses API events as SSE, each named by its type; an error after the start becomes
    an `error` event (the Responses API sends no `[DONE]`)."""
    yield {"event": first["type"], "data": json.dumps(first)}
    last = first
    try:
        async for event in events:
            last = event
            yield {"event": event["type"], "data": json.dumps(event)}
    except Exception as e:
        logger.warning("stream %s ended with error: %r", request_id, e)
        error = unwrap(e).to_body()["error"]
        body = {"type": "error", "sequence_number": last["sequence_number"] + 1, **error}
        yield {"event": "error", "data": json.dumps(body)}


async def named_event_stream(
    events: AsyncIterator[dict], request_id: str | None, keepalive_s: float
) -> EventSourceResponse:
    """An SSE response of Responses API events; like `event_stream`, errors before the first
    event still get their status code."""
    first = await anext(events)
    return _sse(_named_events(first, events, request_id), keepalive_s)


# Headers Ray Serve's proxy and direct ingress read as instructions from the client: one disables
# the request timeout, the other keeps a request running after its client has gone.
SERVE_CONTROL_HEADERS = (b"x-request-timeout-seconds", b"x-request-disconnect-disabled")
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class ClientHeaderScrub:
    """Pure ASGI, in front of Serve's own HTTP handling (its proxy and its direct ingress, through
    `deployments.proxy`): the client may not turn off Serve's timeout or its disconnect
    handling, and a request id is kept only when it is a short plain token (it lands in every
    log line), else Serve makes a fresh one."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = []
            for name, value in scope["headers"]:
                name = name.lower()
                if name in SERVE_CONTROL_HEADERS:
                    continue
                if name == REQUEST_ID_HEADER.encode() and not _REQUEST_ID.fullmatch(value):
                    continue
                headers.append((name, value))
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


class SendTimeout:
    """Pure ASGI, around Serve's HTTP servers (`deployments.proxy`): a response the client stops
    reading is abandoned once one write has waited `timeout_s` for the socket to drain. The
    server then sees the client as gone (its `receive` says `http.disconnect`), so Serve cancels
    the call behind it and the engine frees that request's KV slot, instead of generating for a
    reader that will never read."""

    def __init__(self, app: ASGIApp, timeout_s: float = 30.0):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # One future for the request, set when a write times out: whoever waits on `receive`
        # wakes on it, so no task is made per receive beyond the receive itself.
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def timed_send(message: Message) -> None:
            if gone.done():  # dropped; yield, so whoever waits on `receive` hears of it now
                await asyncio.sleep(0)
                return
            try:
                async with asyncio.timeout(self.timeout_s):  # a timer, not a task per message
                    await send(message)
            except TimeoutError:
                logger.warning(
                    "%s %s: the client read nothing for %gs; dropping it",
                    scope["method"],
                    scope["path"],
                    self.timeout_s,
                )
                gone.set_result(None)

        async def watched_receive() -> Message:
            if gone.done():
                return {"type": "http.disconnect"}
            message = asyncio.ensure_future(receive())
            try:
                await asyncio.wait({message, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the caller gives up waiting: the receive may not outlive this call
                arrived = message.done()
                if not arrived:
                    message.cancel()
            return message.result() if arrived else {"type": "http.disconnect"}

        await self.app(scope, watched_receive, timed_send)


class EdgeAdmission:
    """Pure ASGI, in Serve's proxy (`deployments.proxy`): the ingress's `Admission`, counting the
    generation requests this proxy holds open, so that past `limit` one is refused here with the
    ingress's own 503, before Serve routes it. A refusal then costs the proxy a header and a
    count, and never queues behind the admitted requests' work on the ingress replica's loop. As
    at the ingress, a body that arrives in pieces stops counting until it is in (slow uploads
    keep no one out); it then counts again unchecked, since the ingress behind decides. The
    ingress's admission stays the limit that holds; this one is what this proxy lets through, at
    most `admission.max_inflight_requests` times the ingress replicas behind it."""

    def __init__(
        self, app: ASGIApp, limit: int, retry_after_s: int = 1, on_refused: Callable[[], None] = lambda: None
    ):
        self.app = app
        config = AdmissionConfig(max_inflight_requests=limit, retry_after_s=retry_after_s, max_receiving=0)
        self.admission = Admission(config, knob="LLAVA_SERVE_EDGE_MAX_INFLIGHT at this proxy")
        self.on_refused = on_refused  # the proxy counts them (a metric); nothing behind it sees them

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(GUARDED_PATHS):
            await self.app(scope, receive, send)
            return
        try:
            slot = self.admission.take()
        except Overloaded as e:
            await error_response(e)(scope, receive, send)
            self.on_refused()
            return

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                if message.get("more_body", False):
                    slot.release()
                else:
                    slot.hold()
            return message

        try:
            await self.app(scope, counted_receive, send)
        finally:
            slot.release()


def json_body(model: type[BaseModel]) -> dict:
    """An OpenAPI `requestBody` for a route that reads its body raw (see `install` for the schema)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"required": True, "content": {"application/json": {"schema": ref}}}


def request_id(request: Request) -> str:
    return request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex


class RequestGuard:
    """Pure ASGI, in front of FastAPI, before a byte of any body is read or parsed: the Host
    allow-list and the API key on every route but the open ones, then, on the generation routes,
    the body's size and arrival rate, and the in-flight count once the body is in. A refusal here
    costs a header lookup or a count, so overload and strangers are answered in milliseconds
    whatever the request carries."""

    def __init__(
        self,
        app: ASGIApp,
        limits: LimitsConfig,
        admission: Admission,
        on_rejected: Callable[[LlavaServeError, str | None], None] = lambda error, request_id: None,
        keys: ApiKeys | None = None,
        hosts: HostCheck | None = None,
        public_models: bool = False,
    ):
        self.app = app
        self.admission = admission
        self.on_rejected = on_rejected  # refusals never reach the app: the caller counts them
        self.keys = keys or ApiKeys([])
        self.open_paths = OPEN_PATHS | (PUBLIC_MODEL_PATHS if public_models else frozenset())
        self.configure(limits, hosts or HostCheck([]))

    def configure(self, limits: LimitsConfig, hosts: HostCheck) -> None:
        """New limits and host names, for the next request."""
        self.limits = limits
        self.max_bytes = limits.max_request_bytes
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        rid = headers.get(REQUEST_ID_HEADER.encode(), b"").decode() or None
        path = scope["path"]
        # Serve may hand over the path with the app's route prefix in front.
        local = path.removeprefix(scope.get("root_path", "")) or "/"
        slot: Slot | None = None
        try:
            self.hosts.check(headers.get(b"host"))
            if local not in self.open_paths:
                self.keys.check(headers.get(b"authorization"))
            if not path.endswith(GUARDED_PATHS):
                await self.app(scope, receive, send)
                return
            declared = headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_large(int(declared))
            # The slot is taken on arrival, so that overload is refused before anything is read
            # (on Serve's proxy path reading is a round trip to the proxy, behind its other work).
            slot = self.admission.take()
            body = await self._read_body(receive, slot)
            if body is None:  # the caller left before its body was in
                slot.release()
                return
        except (InvalidRequest, Unauthorized, Overloaded) as e:
            if slot is not None:
                slot.release()
            response = error_response(e, rid)
            if isinstance(e, Unauthorized):
                response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            self.on_rejected(e, rid)
            return
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            slot.release()

    def _too_large(self, size: int) -> RequestTooLarge:
        return RequestTooLarge(
            f"request body is {size} bytes, over this server's limit of {self.max_bytes} "
            "(limits.max_request_bytes)"
        )

    async def _read_body(self, receive: Receive, slot: Slot) -> bytes | None:
        """The whole body, counted as it arrives in bytes and in JSON values (`bounds.json_values`):
        past either limit the refusal goes out at once and the rest is never read. A body that
        does not come in one piece gives its in-flight `slot` back while the rest arrives (so a
        crowd of slow uploads cannot keep a quick request out), is counted among the bodies being
        received, is held to `limits.min_body_bytes_per_s` after `limits.body_grace_s` (a 408
        otherwise), and takes a slot again once it is in."""
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks = [message.get("body", b"")]
        self._check_counts(len(chunks[0]), bounds.json_values(chunks[0]))
        if not message.get("more_body", False):
            return chunks[0]
        loop, rate = asyncio.get_running_loop(), self.limits.min_body_bytes_per_s
        started, received, values = loop.time(), len(chunks[0]), bounds.json_values(chunks[0])
        with slot.lent():
            while message.get("more_body", False):
                wait = None
                if rate:
                    wait = started + self.limits.body_grace_s + received / rate - loop.time()
                try:
                    message = await asyncio.wait_for(receive(), max(wait, 0.0) if wait is not None else None)
                except TimeoutError:
                    raise BodyTimeout(
                        f"the request body arrived at {received / (loop.time() - started):.0f} bytes/s, "
                        f"under this server's minimum of {rate} (limits.min_body_bytes_per_s)"
                    ) from None
                if message["type"] != "http.request":
                    return None
                chunk = message.get("body", b"")
                received += len(chunk)
                values += bounds.json_values(chunk)
                self._check_counts(received, values)
                chunks.append(chunk)
        return b"".join(chunks)

    def _check_counts(self, received: int, values: int) -> None:
        if received > self.max_bytes:
            raise self._too_large(received)
        if values > self.limits.max_json_values:
            raise bounds.too_many_values(self.limits)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, as one message; after it, the connection's own messages (the
    disconnect a streaming response listens for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def install(app: FastAPI, body_models: tuple[type[BaseModel], ...] = ()) -> None:
    """Register the error handlers on `app`, and the schemas of `body_models` (bodies its routes
    read raw) in its OpenAPI document. (Request ids need no middleware: Serve's proxy sets
    x-request-id on the request, keeping the client's, and echoes it on the response.)"""

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in body_models:
                own = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(own.pop("$defs", {}))
                components[model.__name__] = own
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        error, rid = invalid_from_validation(exc), request_id(request)
        # The body never reached a handler; whoever serves the app may count it (`app.state`).
        on_rejected = getattr(request.app.state, "on_rejected", None)
        if on_rejected is not None:
            on_rejected(error, rid)
        return error_response(error, rid)

    @app.exception_handler(LlavaServeError)
    async def _typed(request: Request, exc: LlavaServeError):
        return error_response(exc, request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def _framework(request: Request, exc: StarletteHTTPException):
        """FastAPI's own refusals (a body it cannot parse, JSON nested past the decoder's depth, an
        unknown route or method) in OpenAI's shape with their own status."""
        if exc.status_code == 404:
            error = NotFound(f"no route {request.method} {request.url.path}")
        else:
            error = InvalidRequest(str(exc.detail), None, "invalid_request")
            error.status_code = exc.status_code  # 400, 405, 422...: FastAPI's own, kept
        return error_response(error, request_id(request))
