"""The Responses API with the official client's `responses.create`, `responses.stream` and
`responses.parse`, and the OpenAI Agents SDK running an agent with one tool."""

import openai
import pytest

from tests.support.media import data_uri, random_image
from tests.support.oracle import hf_greedy
from tests.support.schemas import Weather


@pytest.fixture
def client(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)


def image_input(url: str, question: str) -> list[dict]:
    content = [{"type": "input_image", "image_url": url}, {"type": "input_text", "text": question}]
    return [{"role": "user", "content": content}]


def test_create_answers_as_generate_does_with_instructions_and_an_image(client, processor, hf_model):
    image = random_image(31, (52, 70))
    out = client.responses.create(
        model="llava-tiny",
        instructions="Answer briefly.",
        input=image_input(data_uri(image), "What is it?"),
        max_output_tokens=12,
        temperature=0,
    )
    as_chat = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "x"}},
                {"type": "text", "text": "What is it?"},
            ],
        },
    ]
    expected, prompt_tokens = hf_greedy(processor, hf_model, as_chat, [image], 12)
    assert out.object == "response" and out.output_text == expected
    assert out.usage.input_tokens == prompt_tokens
    assert out.status in ("completed", "incomplete")
    if out.status == "incomplete":
        assert out.incomplete_details.reason == "max_output_tokens" and out.usage.output_tokens == 12


def test_a_string_input_streams_openais_event_sequence(client):
    kinds, deltas = [], []
    with client.responses.stream(
        model="llava-tiny", input="Tell me a story.", max_output_tokens=10
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    for kind in ("response.output_item.added", "response.output_text.done", "response.output_item.done"):
        assert kind in kinds
    assert final.output_text == "".join(deltas) and final.usage.output_tokens <= 10


def test_parse_returns_the_pydantic_model(client):
    out = client.responses.parse(
        model="llava-tiny",
        input="Weather in Oslo?",
        text_format=Weather,
        max_output_tokens=200,
        temperature=1.0,
    )
    assert isinstance(out.output_parsed, Weather)


def test_a_forced_tool_is_a_function_call_item_and_its_output_is_answered(client):
    tool = {"type": "function", "name": "get_weather", "parameters": Weather.model_json_schema()}
    first = client.responses.create(
        model="llava-tiny",
        input="Weather in Oslo?",
        tools=[tool],
        tool_choice="required",
        max_output_tokens=200,
    )
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    Weather.model_validate_json(call.arguments)
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "21 degrees"},
    ]
    final = client.responses.create(model="llava-tiny", input=history, tools=[tool], max_output_tokens=8)
    assert final.output[0].type == "message"


def test_previous_response_id_is_refused_since_nothing_is_stored(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="llava-tiny", input="hi", previous_response_id="resp_1")
    assert info.value.body["param"] == "previous_response_id" and "stores no responses" in info.value.message


def test_a_bad_request_names_the_field(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="llava-tiny", input="hi", temperature=5)
    assert info.value.body["param"] == "temperature"


async def test_the_agents_sdk_runs_an_agent_with_one_forced_tool(serve_url):
    """The SDK's own Responses model, streaming, with a pydantic model argument (its schema's
    `$defs` nested under the call)."""
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    calls: list[tuple[str, str]] = []

    @function_tool
    def get_weather(weather: Weather) -> str:
        """Look up the weather in a city."""
        calls.append((weather.city, weather.unit))
        return "21 degrees"

    client = openai.AsyncOpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)
    agent = Agent(
        name="weather",
        instructions="Answer with the weather.",
        tools=[get_weather],
        model=OpenAIResponsesModel(model="llava-tiny", openai_client=client),
        model_settings=ModelSettings(tool_choice="required", max_tokens=200),
        # The tool's result is the answer: a random-weight model's free text runs to max_tokens,
        # which the SDK treats as a failed turn.
        tool_use_behavior="stop_on_first_tool",
    )
    result = await Runner.run(agent, "What is the weather in Oslo?", max_turns=3)
    assert len(calls) == 1 and len(calls[0][0]) <= 10
    assert result.final_output == "21 degrees"
