"""HTTP concerns in one place: errors to status codes and bodies, SSE framing, request ids.

Everything that reaches a handler here is already typed (`ChatService` unwraps errors that
crossed a Ray boundary), so FastAPI's own 500 path is left for bugs.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from llava_serve.chat import invalid_from_validation
from llava_serve.errors import LlavaServeError, Overloaded, unwrap

logger = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"


def error_response(error: BaseException, request_id: str | None = None) -> JSONResponse:
    """The one mapping from an exception to an HTTP status and OpenAI error body."""
    typed = unwrap(error)
    if typed.status_code >= 500:
        logger.error("request %s failed: %r", request_id, error)
    body = typed.to_body()
    if request_id and typed.status_code >= 500:
        body["error"]["message"] += f" (request id {request_id})"
    headers = {"Retry-After": str(typed.retry_after_s)} if isinstance(typed, Overloaded) else {}
    return JSONResponse(body, status_code=typed.status_code, headers=headers)


def sse_error(error: BaseException, request_id: str | None = None) -> str:
    """An error after streaming began: an OpenAI-style error event instead of a status code."""
    return f"data: {json.dumps(unwrap(error).to_body())}\n\n"


async def sse(chunks: AsyncIterator[BaseModel], request_id: str | None = None) -> AsyncIterator[str]:
    """Frame chunks as server-sent events, ending with `[DONE]`; a late error becomes an event."""
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json(exclude_none=False)}\n\n"
    except Exception as e:
        logger.warning("stream %s ended with error: %r", request_id, e)
        yield sse_error(e, request_id)
    yield "data: [DONE]\n\n"


def request_id(request: Request) -> str:
    return request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex


def install(app: FastAPI) -> None:
    """Register the error handlers and the request-id middleware on `app`."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(invalid_from_validation(exc), request.state.request_id)

    @app.exception_handler(LlavaServeError)
    async def _typed(request: Request, exc: LlavaServeError):
        return error_response(exc, getattr(request.state, "request_id", None))

    @app.middleware("http")
    async def _request_id(request: Request, call_next):
        # Serve's proxy sets x-request-id on the request (keeping the client's) and echoes it
        # on the response; we only make it available to handlers and logs.
        request.state.request_id = request_id(request)
        return await call_next(request)
