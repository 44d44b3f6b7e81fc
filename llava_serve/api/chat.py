"""Chat completions, independent of transport: validated request in, OpenAI objects out.

The service knows nothing of Ray or HTTP. It is given a `Backend` whose calls may return
futures of any kind (Ray's `DeploymentResponse`s in production): image and prompt results are
passed to `generate` unresolved, so preprocessing runs in parallel and the model call starts
as soon as its inputs are ready, without a round trip through the caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from typing import Any, NamedTuple, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from llava_serve.api import bounds
from llava_serve.api.formats import output_format, tool_call_format
from llava_serve.api.messages import MediaSource, media_sources, to_template_messages
from llava_serve.api.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    DetokenizeRequest,
    DetokenizeResponse,
    FunctionCall,
    FunctionCallDelta,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    new_completion_id,
    now,
)
from llava_serve.api.telemetry import RequestRecord, source_kind
from llava_serve.config import AppConfig, LimitsConfig
from llava_serve.engine.sampling import SamplingParams
from llava_serve.errors import EngineError, ImageError, InvalidRequest, ModelNotFound, Unavailable, unwrap
from llava_serve.inputs.fetch import check_data_uri
from llava_serve.structured.spec import OutputFormat
from llava_serve.structured.tools import CallUpdate, ToolCallReader
from llava_serve.types import SampledLogprob, StepOutput, TemplateMessage

logger = logging.getLogger(__name__)
_RETRIES = 3  # of a request whose replica died before its first token


class Backend(Protocol):
    """Where the work happens. `prepare_image` returns a cancellable awaitable `PreparedImage` (its pixels
    may stay a reference the model resolves); `tokenize` and `generate` take what they are given
    unresolved. `generate` streams `ACCEPTED` first, once the engine has queued the request,
    then the request's outputs."""

    def prepare_image(self, source: MediaSource, num_images: int) -> Any: ...
    def tokenize(
        self,
        messages: list[TemplateMessage],
        max_tokens: int,
        media_tokens: list[int],
        add_generation_prompt: bool = True,
        media_hashes: list[str] | None = None,
    ) -> Any: ...
    # /tokenize and /detokenize: the tokenizer's own encoding of a text, the text of ids, each
    # id's vocabulary string, and the model's context length.
    def encode(self, text: str, add_special_tokens: bool) -> Any: ...
    def decode(self, ids: list[int]) -> Any: ...
    def pieces(self, ids: list[int]) -> Any: ...
    def context_length(self) -> Any: ...
    def generate(
        self, prompt: Any, params: SamplingParams, images: list[Any]
    ) -> AsyncIterator[StepOutput]: ...


M = TypeVar("M", bound=BaseModel)


def parse_request(body: Any, limits: LimitsConfig | None = None, model: type[M] = ChatCompletionRequest) -> M:
    """Validate a request body (raw bytes from HTTP, or a dict from a handle) against `limits`
    first, then the request model, naming the first offending field in the error."""
    if isinstance(body, model):
        return body
    limits = limits or LimitsConfig()
    if isinstance(body, bytes | bytearray):
        body = bounds.decode_body(body)
    bounds.check_shape(body, limits)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise invalid_from_validation(e) from None


def invalid_from_validation(e: ValidationError | Any) -> InvalidRequest:
    """The most specific validation error as an `InvalidRequest` naming its field.

    For a field that takes a union (`content`: a string or a list of parts) pydantic reports
    one error per member; the deepest one is what the caller got wrong, and when none goes
    deeper than the union itself, the caller is told every shape that would have been valid.
    """
    errors = e.errors()
    depth = max(len(err.get("loc", ())) for err in errors)
    deepest = [err for err in errors if len(err.get("loc", ())) == depth]
    path = field_path(deepest[0].get("loc", ()))
    same_field = [err for err in deepest if field_path(err.get("loc", ())) == path]
    message = " or ".join(dict.fromkeys(err.get("msg", "invalid value") for err in same_field))
    return InvalidRequest(f"{path or 'request'}: {message}", path or None)


_UNION_MEMBERS = {"str", "int", "float", "bool", "none", "list", "dict"}


def field_path(loc: tuple) -> str:
    """`('messages', 0, 'content', 'list[...]', 1, 'image_url', 'image_url', 'url')` ->
    `messages[0].content[1].image_url.url`: pydantic's union member and tag markers dropped."""
    out, skip_tag = "", False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if part == "body" and not out:
            continue  # FastAPI's prefix
        if "[" in part or part in _UNION_MEMBERS:
            skip_tag = "tagged-union" in part
            continue
        if skip_tag:  # the discriminator value of a tagged union, not a field
            skip_tag = False
            continue
        out += f".{part}" if out else part
    return out


class ParsedRequest(NamedTuple):
    request: ChatCompletionRequest
    output: OutputFormat | None


class ChatService:
    def __init__(self, config: AppConfig, backend: Backend, takes_video: bool):
        self.config = config
        self.backend = backend
        self.takes_video = takes_video
        self.model_names = {config.model.public_name, config.model.name}
        self._context_length: int | None = None

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise ModelNotFound(
                f"model {model!r} is not served here; this server serves {self.config.model.public_name!r}"
            )

    async def _media(self, messages: list, record: RequestRecord | None) -> list[Any]:
        """Every image and video of `messages`, checked, fetched and preprocessed at once."""
        sources = media_sources(messages)
        if record is not None:
            record.image_sources = [source_kind(s.url) for s in sources]
        limit = self.config.images.max_images_per_request
        if len(sources) > limit:
            raise InvalidRequest(f"request has {len(sources)} images; the limit is {limit}", "messages")
        videos = [s for s in sources if s.kind == "video"]
        if videos and not self.takes_video:  # before anything is fetched
            raise ImageError(
                "this model does not take video (video_url parts)", videos[0].param, "video_not_supported"
            )
        for source in sources:
            if source.url.startswith("data:"):  # refuse an oversized inline image here, not after shipping it
                limits = self.config.images if source.kind == "image" else self.config.images.for_video()
                check_data_uri(source.url, limits, source.param)
        # Every fetch starts at once; how many tokens each image becomes (its size and detail
        # decide, on anyres models) is known when it is preprocessed, and the prompt is
        # tokenized as soon as all are. The tokenizer gets the text and those counts, never pixels.
        pending = [self.backend.prepare_image(source, len(sources)) for source in sources]
        try:
            return list(await asyncio.gather(*pending)) if pending else []
        except BaseException as e:
            # One image failed (or the caller left): the others' fetches and decodes are not worth
            # finishing. A Serve response cancels its call in the replica.
            for call in pending:
                call.cancel()
            if isinstance(e, Exception):
                raise unwrap(e) from e
            raise

    async def _start(
        self, request: ChatCompletionRequest, output: OutputFormat | None, record: RequestRecord | None
    ) -> AsyncIterator[StepOutput]:
        self._check_model(request.model)
        params = SamplingParams.resolve(
            self.config.generation,
            max_tokens=request.requested_max_tokens(),
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            stop=request.stop_list(),
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
            logit_bias=request.logit_bias,
            output=output,
            min_p=request.min_p,
            ignore_eos=request.ignore_eos,
            min_tokens=request.min_tokens,
            stop_token_ids=request.stop_token_ids or (),
            include_stop_str_in_output=request.include_stop_str_in_output,
            skip_special_tokens=request.skip_special_tokens,
            n=request.n,
        )
        images = await self._media(request.messages, record)
        counts = [image.num_tokens for image in images]
        hashes = [image.content_hash for image in images]  # the prompt's routing key needs them
        prompt = self.backend.tokenize(
            to_template_messages(request.messages), params.max_tokens, counts, media_hashes=hashes
        )
        outputs = _typed(self.backend.generate(prompt, params, images))
        return outputs if record is None else _recorded(outputs, record)

    async def _begin(
        self, request: ChatCompletionRequest, output: OutputFormat | None, record: RequestRecord | None
    ) -> AsyncIterator[StepOutput]:
        """Start generation and wait until the engine has queued it, so errors up to then
        (validation, images, prompt length, overload) raise here, while a transport can still
        answer with a status code. Until then nothing has been sent or sampled, so a request that
        lost its replica (a preprocessor or the model died under it) is retried, a little later
        each time: the router needs a moment to stop choosing the dead replica."""
        retries = 0
        while True:
            try:
                outputs = await self._start(request, output, record)
                if not (await anext(outputs)).accepted:  # a contract check that survives `python -O`
                    raise EngineError("the model's stream did not start with its acceptance marker")
                return outputs
            except Unavailable:
                if retries == _RETRIES:
                    raise
                retries += 1
                logger.warning("a replica died before the first token; retry %d of %d", retries, _RETRIES)
                await asyncio.sleep(0.2 * retries)

    async def parse(self, body: Any) -> ParsedRequest:
        """The request and the format its answer must take, worked out on a thread: bodies are
        checked against the limits first, but a large one still takes milliseconds to parse and a
        schema to check, and the loop has streams to relay meanwhile."""
        if isinstance(body, ParsedRequest):
            return body

        def work() -> ParsedRequest:
            request = parse_request(body, self.config.limits)
            return ParsedRequest(request, output_format(request))

        return await asyncio.to_thread(work)

    async def tokenize(self, body: Any) -> TokenizeResponse:
        """vLLM's /tokenize: a prompt as the tokenizer encodes it, or chat messages as the model is
        given them (their images fetched and preprocessed, so each counts what it will cost)."""
        request = await asyncio.to_thread(parse_request, body, self.config.limits, TokenizeRequest)
        self._check_model(request.model)
        if request.prompt is not None:
            if len(request.prompt) > self.config.limits.max_text_chars:
                raise InvalidRequest(
                    f"prompt is over {self.config.limits.max_text_chars} characters (limits.max_text_chars)",
                    "prompt",
                )
            ids = await _typed_call(self.backend.encode(request.prompt, request.add_special_tokens))
        else:
            images = await self._media(request.messages, None)
            messages = to_template_messages(request.messages)
            counts = [image.num_tokens for image in images]
            prompt = self.backend.tokenize(messages, 0, counts, request.add_generation_prompt)
            ids = (await _typed_call(prompt)).input_ids
        strs = await _typed_call(self.backend.pieces(ids)) if request.return_token_strs else None
        if self._context_length is None:  # the checkpoint's, asked of the tokenizer once
            self._context_length = await _typed_call(self.backend.context_length())
        return TokenizeResponse(
            count=len(ids), max_model_len=self._context_length, tokens=ids, token_strs=strs
        )

    async def detokenize(self, body: Any) -> DetokenizeResponse:
        """vLLM's /detokenize: the text of token ids, special tokens included."""
        request = await asyncio.to_thread(parse_request, body, self.config.limits, DetokenizeRequest)
        self._check_model(request.model)
        if len(request.tokens) > self.config.limits.max_text_chars:
            raise InvalidRequest(
                f"tokens holds over {self.config.limits.max_text_chars} ids (limits.max_text_chars)", "tokens"
            )
        return DetokenizeResponse(prompt=await _typed_call(self.backend.decode(request.tokens)))

    async def complete(self, body: Any, record: RequestRecord | None = None) -> ChatCompletion:
        """A whole (non-streamed) chat completion; `record`, if given, is filled as it runs."""
        request, output = await self.parse(body)
        outputs = await self._begin(request, output, record)
        text: dict[int, list[str]] = defaultdict(list)
        logprobs: dict[int, list[SampledLogprob]] = defaultdict(list)
        last: dict[int, StepOutput] = {}
        async for out in outputs:
            text[out.index].append(out.text)
            logprobs[out.index] += out.logprobs
            last[out.index] = out
        choices = []
        for index in sorted(last):
            message, finish = AssistantMessage(content="".join(text[index])), last[index].finish_reason
            if tool_call_format(request) is not None:
                message, finish = _tool_call_message(request, message.content, finish)
            logprob = _logprobs(logprobs[index]) if request.logprobs else None
            choices.append(Choice(index=index, message=message, finish_reason=finish, logprobs=logprob))
        return ChatCompletion(
            id=new_completion_id(),
            created=now(),
            model=self.config.model.public_name,
            choices=choices,
            usage=_usage(last.values()),
        )

    async def stream(
        self, body: Any, record: RequestRecord | None = None
    ) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks in OpenAI's streaming shape, each choice's with its `index`. The first (the
        assistant role) comes once the engine has queued the request; errors before that raise on
        the first `anext`, so a transport can still answer them with a status code instead of a
        broken stream."""
        request, output = await self.parse(body)
        outputs = await self._begin(request, output, record)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        cid, created, model = new_completion_id(), now(), self.config.model.public_name
        n = request.n
        # Per choice: logprobs of tokens whose text is still held back, and a forced call's reader.
        pending: list[list[SampledLogprob]] = [[] for _ in range(n)]
        calls = [_tool_call_reader(request) for _ in range(n)]

        def chunk(index: int, delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
            logprobs = _logprobs(pending[index]) if request.logprobs and pending[index] else None
            pending[index].clear()
            choice = ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
            return ChatCompletionChunk(id=cid, created=created, model=model, choices=[choice])

        for index in range(n):
            yield chunk(
                index, Delta(role="assistant") if calls[index] else Delta(role="assistant", content="")
            )
        last: dict[int, StepOutput] = {}
        async for out in outputs:
            i, reader = out.index, calls[out.index]
            last[i] = out
            pending[i] += out.logprobs
            if reader is not None:
                if (delta := reader.feed(out.text)) is not None:
                    yield chunk(i, _call_delta(delta))
            elif out.text:
                yield chunk(i, Delta(content=out.text))
            if out.finish_reason is None:
                continue
            finish = out.finish_reason
            if reader is not None:
                if (delta := reader.finish(finish == "stop")) is not None:
                    yield chunk(i, _call_delta(delta))
                finish = "tool_calls" if finish == "stop" and reader.name is not None else finish
            yield chunk(i, Delta(), finish)
        if include_usage:
            yield ChatCompletionChunk(
                id=cid, created=created, model=model, choices=[], usage=_usage(last.values())
            )


def _tool_call_reader(request: ChatCompletionRequest) -> ToolCallReader | None:
    call = tool_call_format(request)
    return None if call is None else ToolCallReader(call)


def _tool_call_message(
    request: ChatCompletionRequest, text: str, finish: str | None
) -> tuple[AssistantMessage, str | None]:
    """A forced call's answer as `tool_calls`; finish_reason "tool_calls" once the call is complete
    ("length" when max_tokens cut it, its arguments then incomplete)."""
    reader = _tool_call_reader(request)
    reader.feed(text)
    reader.finish(finish == "stop")
    if reader.name is None:  # cut before the function's name was complete: no call to report
        return AssistantMessage(content=None), finish
    call = ToolCall(id=reader.call_id, function=FunctionCall(name=reader.name, arguments=reader.arguments))
    return AssistantMessage(content=None, tool_calls=[call]), "tool_calls" if finish == "stop" else finish


def _call_delta(delta: CallUpdate) -> Delta:
    head = delta.name is not None
    return Delta(
        tool_calls=[
            ToolCallDelta(
                id=delta.call_id,
                type="function" if head else None,
                function=FunctionCallDelta(name=delta.name, arguments=delta.arguments),
            )
        ]
    )


async def _typed_call(call: Any) -> Any:
    """A backend call's result, with whatever it raised as our typed error (Ray wraps them)."""
    try:
        return await call
    except Exception as e:
        raise unwrap(e) from e


async def _typed(outputs: AsyncIterator[StepOutput]) -> AsyncIterator[StepOutput]:
    """Re-raise whatever the backend raised as our typed error (Ray wraps remote exceptions)."""
    try:
        async for out in outputs:
            yield out
    except Exception as e:
        raise unwrap(e) from e


async def _recorded(outputs: AsyncIterator[StepOutput], record: RequestRecord) -> AsyncIterator[StepOutput]:
    produced: dict[int, int] = {}  # completion tokens by choice: the record counts them all
    async for out in outputs:
        produced[out.index] = out.completion_tokens
        record.token(sum(produced.values()), out.prompt_tokens)
        record.stages.update(out.stages or {})
        record.finish_reason = out.finish_reason
        yield out


def _logprobs(entries: list[SampledLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=list(e.bytes),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(b)) for t, b, lp in e.top],
            )
            for e in entries
        ]
    )


def _usage(lasts: Iterable[StepOutput]) -> Usage:
    """The prompt once, however many choices were generated from it, and every choice's tokens."""
    lasts = list(lasts)
    prompt, completion = lasts[0].prompt_tokens, sum(last.completion_tokens for last in lasts)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=lasts[0].cached_tokens),
    )
