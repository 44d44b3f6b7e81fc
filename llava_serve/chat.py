"""Chat completions, independent of transport: validated request in, OpenAI objects out.

The service knows nothing of Ray or HTTP. It is given a `Backend` whose calls may return
futures of any kind (Ray's `DeploymentResponse`s in production): image and prompt results are
passed to `generate` unresolved, so preprocessing runs in parallel and the model call starts
as soon as its inputs are ready, without a round trip through the caller.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from pydantic import ValidationError

from llava_serve.config import AppConfig
from llava_serve.errors import InvalidRequest, ModelNotFound, unwrap
from llava_serve.prompts import image_sources
from llava_serve.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
    new_completion_id,
    now,
)
from llava_serve.sampling import SamplingParams
from llava_serve.sequence import StepOutput


class Backend(Protocol):
    def prepare_image(self, source: str, param: str) -> Any: ...
    def tokenize(self, messages: list, max_tokens: int) -> Any: ...
    def generate(
        self, prompt: Any, params: SamplingParams, images: list[Any]
    ) -> AsyncIterator[StepOutput]: ...


def parse_request(body: Any) -> ChatCompletionRequest:
    """Validate a raw request body, naming the first offending field in the error."""
    if isinstance(body, ChatCompletionRequest):
        return body
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise invalid_from_validation(e) from None


def invalid_from_validation(e: ValidationError | Any) -> InvalidRequest:
    """The first pydantic/FastAPI validation error as an `InvalidRequest` naming its field."""
    first = e.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return InvalidRequest(f"{param or 'request'}: {first.get('msg', 'invalid value')}", param)


class ChatService:
    def __init__(self, config: AppConfig, backend: Backend):
        self.config = config
        self.backend = backend
        self.model_names = {config.model.public_name, config.model.name}

    def _start(self, request: ChatCompletionRequest) -> tuple[AsyncIterator[StepOutput], SamplingParams]:
        if request.model is not None and request.model not in self.model_names:
            raise ModelNotFound(
                f"model {request.model!r} is not served here; this server serves "
                f"{self.config.model.public_name!r}"
            )
        sources = image_sources(request.messages)
        limit = self.config.images.max_images_per_request
        if len(sources) > limit:
            raise InvalidRequest(f"request has {len(sources)} images; the limit is {limit}", "messages")
        params = SamplingParams.resolve(
            self.config.generation,
            max_tokens=request.requested_max_tokens(),
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            stop=request.stop_list(),
        )
        images = [self.backend.prepare_image(url, param) for url, param in sources]
        prompt = self.backend.tokenize(request.messages, params.max_tokens)
        return _typed(self.backend.generate(prompt, params, images)), params

    async def complete(self, body: Any) -> ChatCompletion:
        """A whole (non-streamed) chat completion."""
        request = parse_request(body)
        outputs, _ = self._start(request)
        text, last = [], None
        async for out in outputs:
            text.append(out.text)
            last = out
        return ChatCompletion(
            id=new_completion_id(),
            created=now(),
            model=self.config.model.public_name,
            choices=[
                Choice(message=AssistantMessage(content="".join(text)), finish_reason=last.finish_reason)
            ],
            usage=_usage(last),
        )

    async def stream(self, body: Any) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks in OpenAI's streaming shape. Errors before the first token raise on first `anext`,
        so a transport can still answer them with a status code instead of a broken stream."""
        request = parse_request(body)
        outputs, _ = self._start(request)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        cid, created, model = new_completion_id(), now(), self.config.model.public_name

        def chunk(delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=cid, created=created, model=model, choices=[ChunkChoice(delta=delta, finish_reason=finish)]
            )

        first = await anext(aiter(outputs))  # surfaces validation and image errors before any chunk
        yield chunk(Delta(role="assistant", content=""))
        last = first
        async for out in _prepend(first, outputs):
            last = out
            if out.text:
                yield chunk(Delta(content=out.text))
        yield chunk(Delta(), last.finish_reason)
        if include_usage:
            yield ChatCompletionChunk(id=cid, created=created, model=model, choices=[], usage=_usage(last))


async def _typed(outputs: AsyncIterator[StepOutput]) -> AsyncIterator[StepOutput]:
    """Re-raise whatever the backend raised as our typed error (Ray wraps remote exceptions)."""
    try:
        async for out in outputs:
            yield out
    except Exception as e:
        raise unwrap(e) from e


async def _prepend(first: StepOutput, rest: AsyncIterator[StepOutput]) -> AsyncIterator[StepOutput]:
    yield first
    async for out in rest:
        yield out


def _usage(last: StepOutput) -> Usage:
    return Usage(
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        total_tokens=last.prompt_tokens + last.completion_tokens,
    )
