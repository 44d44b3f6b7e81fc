"""The Responses API (`POST /v1/responses`) over the chat service.

A Responses request is translated into the chat completion it means (instructions as a system
message, input items as messages, `text.format` as `response_format`, flat function tools as
chat tools), so it is checked, bounded and generated exactly as chat completions are; the answer
is translated back into a `response` object, or into OpenAI's event sequence when streamed.
Nothing is stored (`store` is accepted, `previous_response_id` is a 400 that says so).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError

from llava_serve.api.chat import ChatService, ParsedRequest, invalid_from_validation, parse_request
from llava_serve.api.formats import output_format
from llava_serve.api.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    FunctionDefinition,
    Usage,
    _Request,
)
from llava_serve.errors import InvalidRequest


class InputText(_Request):
    type: Literal["input_text", "output_text"]
    text: str
    model_config = ConfigDict(extra="ignore")  # replayed output parts carry annotations, logprobs


class InputImage(_Request):
    type: Literal["input_image"]
    image_url: str | None = None
    detail: Literal["auto", "low", "high"] | None = None
    file_id: str | None = None


InputPart = Annotated[InputText | InputImage, Field(discriminator="type")]


class MessageItem(_Request):
    model_config = ConfigDict(extra="ignore")  # replayed output messages carry id and status
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]


class FunctionCallItem(_Request):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Request):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]


class FunctionTool(FunctionDefinition):
    """A chat tool's function, flat: the Responses API's shape."""

    type: Literal["function"]


class NamedFunction(_Request):
    type: Literal["function"]
    name: str


class TextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted; the model has one register


class ResponsesRequest(_Request):
    """POST /v1/responses body: the fields a text-and-image model can honour."""

    model: str | None = None
    input: str | list[MessageItem | FunctionCallItem | FunctionCallOutputItem] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool | None = None  # nothing is stored, whatever it says
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None
    include: list[str] | None = Field(None, max_length=0)


def parse_responses_request(body: Any, service: ChatService) -> tuple[ResponsesRequest, ParsedRequest]:
    """The Responses request and the chat completion it means, both validated."""
    request = parse_request(body, service.config.limits, ResponsesRequest)
    if request.previous_response_id is not None:
        raise InvalidRequest(
            "previous_response_id: this server stores no responses (store is false); send the "
            "conversation's items in `input`",
            "previous_response_id",
        )
    try:
        chat = ChatCompletionRequest.model_validate(_chat_body(request))
    except ValidationError as e:
        raise invalid_from_validation(e) from None
    return request, ParsedRequest(chat, output_format(chat))


def _chat_body(request: ResponsesRequest) -> dict:
    messages: list[dict] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    items = request.input
    if isinstance(items, str):
        items = [MessageItem(role="user", content=items)]
    for item in items:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _parts(item.content)})
        elif isinstance(item, FunctionCallItem):
            function = {"name": item.name, "arguments": item.arguments}
            call = {"id": item.call_id, "type": "function", "function": function}
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    body: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "max_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stream": request.stream,
        "stream_options": {"include_usage": True} if request.stream else None,
        "parallel_tool_calls": request.parallel_tool_calls,
    }
    if request.tools:
        body["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in request.tools
        ]
    if request.tool_choice is not None:
        choice = request.tool_choice
        body["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
        )
    fmt = request.text.format if request.text else None
    if fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name or "response", "schema": fmt.schema_ or {}, "strict": fmt.strict}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt is not None:
        body["response_format"] = {"type": fmt.type}
    return body


def _parts(content: str | list) -> str | list[dict]:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, InputText):
            parts.append({"type": "text", "text": part.text})
        elif part.image_url is None:
            raise InvalidRequest("input_image: file_id is not supported; give image_url", "input")
        else:
            image = {"url": part.image_url, "detail": part.detail}
            parts.append({"type": "image_url", "image_url": image})
    return parts


# -- the answer --------------------------------------------------------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _envelope(request: ResponsesRequest, model: str, created: int, rid: str) -> dict:
    fmt = {"type": "text"}
    if request.text and request.text.format:
        fmt = request.text.format.model_dump(by_alias=True, exclude_none=True)
    choice = request.tool_choice
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "model": model,
        "status": "in_progress",
        "output": [],
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "tools": [t.model_dump(exclude_none=True) for t in request.tools or ()],
        "tool_choice": choice.model_dump() if isinstance(choice, NamedFunction) else choice or "auto",
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "text": {"format": fmt},
        "store": False,
        "previous_response_id": None,
        "metadata": request.metadata or {},
        "incomplete_details": None,
        "error": None,
        "usage": None,
    }


def _usage(usage: Usage) -> dict:
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _finished(envelope: dict, finish: str | None, output: list[dict], usage: dict) -> dict:
    cut = finish == "length"
    return envelope | {
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "output": output,
        "usage": usage,
    }


def _text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [_text(text)]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def response_from_completion(request: ResponsesRequest, completion: ChatCompletion) -> dict:
    choice = completion.choices[0]
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    if choice.message.tool_calls:
        output = [
            _call_item(_id("fc"), c.id, c.function.name, c.function.arguments, status)
            for c in choice.message.tool_calls
        ]
    else:
        output = [_message_item(_id("msg"), choice.message.content or "", status)]
    usage = _usage(completion.usage)
    envelope = _envelope(request, completion.model, completion.created, _id("resp"))
    return _finished(envelope, choice.finish_reason, output, usage)


async def response_events(
    request: ResponsesRequest, chunks: AsyncIterator[ChatCompletionChunk]
) -> AsyncIterator[dict]:
    """OpenAI's event sequence for one answer: created, in_progress, the output item added, its
    deltas, its done events, then completed."""
    first = await anext(chunks)  # raises before anything is sent: the caller still answers 4xx
    envelope = _envelope(request, first.model, first.created, _id("resp"))
    numbers = itertools.count()

    def event(kind: str, **fields) -> dict:
        return {"type": kind, "sequence_number": next(numbers), **fields}

    def message_added(item_id: str) -> list[dict]:
        """The message item and its one text part, both still empty."""
        item = _message_item(item_id, "", "in_progress") | {"content": []}
        return [
            event("response.output_item.added", output_index=0, item=item),
            event(
                "response.content_part.added",
                item_id=item_id,
                output_index=0,
                content_index=0,
                part=_text(""),
            ),
        ]

    yield event("response.created", response=envelope)
    yield event("response.in_progress", response=envelope)
    item_id, text, finish, usage = None, [], None, None
    call: dict | None = None
    async for chunk in chunks:
        if chunk.usage is not None:
            usage = _usage(chunk.usage)
        for choice in chunk.choices:
            delta = choice.delta
            for tc in delta.tool_calls or ():
                if tc.id is not None:  # the call's head: its id and name
                    item_id = _id("fc")
                    call = _call_item(item_id, tc.id, tc.function.name or "", "", "in_progress")
                    yield event("response.output_item.added", output_index=0, item=call)
                if tc.function.arguments:
                    call["arguments"] += tc.function.arguments
                    yield event(
                        "response.function_call_arguments.delta",
                        item_id=item_id,
                        output_index=0,
                        delta=tc.function.arguments,
                    )
            if delta.content and item_id is None:  # the answer's text begins
                item_id = _id("msg")
                for added in message_added(item_id):
                    yield added
            if delta.content:
                text.append(delta.content)
                yield event(
                    "response.output_text.delta",
                    item_id=item_id,
                    output_index=0,
                    content_index=0,
                    delta=delta.content,
                    logprobs=[],
                )
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    status = "incomplete" if finish == "length" else "completed"
    output: list[dict] = []
    if call is not None:
        call["status"] = status
        yield event(
            "response.function_call_arguments.done",
            item_id=item_id,
            output_index=0,
            name=call["name"],
            arguments=call["arguments"],
        )
        yield event("response.output_item.done", output_index=0, item=call)
        output.append(call)
    else:
        if item_id is None:  # an empty answer still has its message and its one text part
            item_id = _id("msg")
            for added in message_added(item_id):
                yield added
        whole = "".join(text)
        part = _text(whole)
        yield event(
            "response.output_text.done",
            item_id=item_id,
            output_index=0,
            content_index=0,
            text=whole,
            logprobs=[],
        )
        yield event("response.content_part.done", item_id=item_id, output_index=0, content_index=0, part=part)
        done = _message_item(item_id, whole, status)
        yield event("response.output_item.done", output_index=0, item=done)
        output.append(done)
    final = _finished(envelope, finish, output, usage or _usage(0, 0))
    # `response.completed` even when max_output_tokens cut the answer (its status says
    # "incomplete"): the official client's stream helper and the Agents SDK take the final
    # response from that event alone, as vLLM sends it.
    yield event("response.completed", response=final)
