"""The Responses API's stream of events, read by the official client's own stream accumulator."""

from openai import omit
from openai._models import construct_type
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from llava_serve.api.protocol import ChatCompletionChunk, ChunkChoice, Delta, Usage
from llava_serve.api.responses import ResponsesRequest, response_events


def _chunk(content: str | None = None, finish: str | None = None, usage: Usage | None = None):
    choices = [] if usage else [ChunkChoice(delta=Delta(content=content), finish_reason=finish)]
    return ChatCompletionChunk(id="c", created=0, model="m", choices=choices, usage=usage)


async def _events(*chunks: ChatCompletionChunk) -> list[dict]:
    async def stream():
        yield ChatCompletionChunk(
            id="c", created=0, model="m", choices=[ChunkChoice(delta=Delta(role="assistant"))]
        )
        for chunk in chunks:
            yield chunk

    return [e async for e in response_events(ResponsesRequest(input="Hi"), stream())]


def _read(events: list[dict]):
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    for event in events:
        # Built as the client builds what it reads off the wire (`construct_type`, no validation).
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=event))
    return events[-1]["response"]


async def test_an_answer_with_no_text_still_streams_its_message_and_part():
    """A model that ends at once (end-of-sequence first) answers "": the client still gets the
    message item, its one text part added and done, and a completed response."""
    usage = Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4)
    events = await _events(_chunk("", "stop"), _chunk(usage=usage))
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = _read(events)
    assert final["output"][0]["content"][0]["text"] == "" and final["status"] == "completed"


async def test_an_answer_s_text_is_the_sum_of_its_deltas():
    events = await _events(
        _chunk("Hel"),
        _chunk("lo", "length"),
        _chunk(usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)),
    )
    final = _read(events)
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == "Hello" == final["output"][0]["content"][0]["text"]
    assert final["status"] == "incomplete"
