"""Structured outputs over HTTP, the official client, LangChain and handles, on the random-weight
tiny model: whatever it samples, the answer parses and matches the schema it was given."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from ray import serve

from tests.support import schemas
from tests.support.media import data_uri, random_image
from tests.support.oracle import hf_greedy
from tests.support.schemas import Weather

IMAGE = data_uri(random_image(7))


def ask(text: str = "Read the receipt and give me JSON.", **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 300, **extra}


def json_schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


async def post(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, str]:
    """(content, finish_reason), the stream reassembled when `body` asks for one."""
    if not body.get("stream"):
        r = await client.post(url, json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    text, finish = [], None
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    return "".join(text), finish


async def test_50_requests_across_schemas_all_parse_and_validate(serve_url):
    """Greedy and sampled, streamed and not, all at once so constrained rows share batches."""
    kinds = itertools.cycle(itertools.product(sorted(schemas.ALL), [False, True]))
    bodies = []
    for i in range(50):
        name, stream = next(kinds)
        sampling = {"temperature": 0.0} if i % 3 == 0 else {"temperature": 1.0, "seed": i, "top_p": 0.95}
        body = ask(response_format=json_schema_format(name, schemas.ALL[name]), stream=stream, **sampling)
        bodies.append((name, body))
    async with httpx.AsyncClient(timeout=180) as client:
        url = f"{serve_url}/v1/chat/completions"
        answers = await asyncio.gather(*[post(client, url, body) for _, body in bodies])
    for (name, _), (text, finish) in zip(bodies, answers, strict=True):
        assert finish == "stop", (name, text)
        jsonschema.validate(json.loads(text), schemas.ALL[name])


async def test_json_object_answers_are_objects_streamed_and_not(serve_url, processor):
    vocab = processor.tokenizer
    # A bias towards `"` and `}` so the random-weight model closes what it opens within max_tokens.
    closers = {str(i): 5.0 for i in range(len(vocab)) if set(vocab.decode([i])) & set('"}')}
    bodies = [
        ask(
            response_format={"type": "json_object"},
            temperature=1.0,
            seed=seed,
            logit_bias=closers,
            stream=seed % 2 == 1,
        )
        for seed in range(6)
    ]
    async with httpx.AsyncClient(timeout=120) as client:
        answers = await asyncio.gather(*[post(client, f"{serve_url}/v1/chat/completions", b) for b in bodies])
    assert all(finish == "stop" and isinstance(json.loads(text), dict) for text, finish in answers), answers


async def test_text_format_is_free_text(serve_url):
    async with httpx.AsyncClient(timeout=60) as client:
        free = await post(client, f"{serve_url}/v1/chat/completions", ask(temperature=0.0, max_tokens=12))
        text = await post(
            client,
            f"{serve_url}/v1/chat/completions",
            ask(temperature=0.0, max_tokens=12, response_format={"type": "text"}),
        )
    assert text == free


def test_max_tokens_inside_the_json_is_finish_reason_length(serve_url):
    body = ask(response_format=json_schema_format("receipt", schemas.RECEIPT), max_tokens=8)
    choice = httpx.post(f"{serve_url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith("{")


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        (
            {"response_format": json_schema_format("x", {"type": "objectx"})},
            "response_format.json_schema.schema",
            "objectx",
        ),
        (
            {"response_format": json_schema_format("x", {"type": "array", "uniqueItems": True})},
            "response_format.json_schema.schema",
            "uniqueItems",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is required"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "'text', 'json_object' or"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]}
            | {"tool_choice": "required"},
            "tools[f].function.parameters",
            "objectx",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}]}
            | {"tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice",
            "'g' is not among the tools",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ],
)
def test_a_format_that_cannot_be_served_is_a_400_naming_the_problem(serve_url, extra, param, says):
    for stream in (False, True):
        r = httpx.post(f"{serve_url}/v1/chat/completions", json=ask(stream=stream, **extra), timeout=60)
        error = r.json()["error"]
        assert r.status_code == 400 and error["type"] == "invalid_request_error", r.text
        assert error["param"] == param and says in error["message"], error


# -- the official client and LangChain -----------------------------------------------------


class Item(BaseModel):
    desc: str = Field(max_length=8)
    price: int = Field(ge=0, le=100)


class Receipt(BaseModel):
    items: list[Item] = Field(min_length=1, max_length=3)
    paid: bool
    currency: Literal["EUR", "USD", "JPY"]


@pytest.fixture
def client(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)


def messages() -> list[dict]:
    return ask()["messages"]


@pytest.mark.parametrize("seed", [None, 5])
def test_the_official_clients_parse_returns_the_pydantic_model(client, seed):
    sampling = {"temperature": 0.0} if seed is None else {"temperature": 1.0, "seed": seed}
    completion = client.chat.completions.parse(
        model="llava-tiny", messages=messages(), response_format=Receipt, max_tokens=300, **sampling
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Receipt) and completion.choices[0].finish_reason == "stop"


def weather_tools() -> list[dict]:
    return [
        openai.pydantic_function_tool(Weather, name="get_weather"),
        {
            "type": "function",
            "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
        },
    ]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_tool_call_through_the_official_client(client, choice):
    completion = client.chat.completions.create(
        model="llava-tiny",
        messages=messages(),
        tools=weather_tools(),
        tool_choice=choice,
        max_tokens=200,
        temperature=1.0,
        seed=11,
    )
    answer = completion.choices[0]
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    (call,) = answer.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if choice != "required":
        assert call.function.name == "get_weather"
    if call.function.name == "get_weather":
        Weather.model_validate_json(call.function.arguments)
    else:
        assert json.loads(call.function.arguments) == {}


def test_a_streamed_tool_call_reassembles_into_the_same_call(client):
    """The client's own stream accumulator builds the call from the deltas."""
    kwargs = dict(
        model="llava-tiny",
        messages=messages(),
        tools=weather_tools(),
        tool_choice="required",
        max_tokens=200,
        temperature=1.0,
        seed=3,
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    with client.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    (call,) = final.message.tool_calls
    assert final.finish_reason == "tool_calls"
    assert (call.function.name, call.function.arguments) == (whole.function.name, whole.function.arguments)


def langchain_llm(serve_url: str, max_tokens: int):
    """LangChain's OpenAI chat model pointed at the server, greedy."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=f"{serve_url}/v1",
        api_key="unused",
        model="llava-tiny",
        max_tokens=max_tokens,
        temperature=0,
        max_retries=0,
    )


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_with_structured_output(serve_url, method):
    structured = langchain_llm(serve_url, max_tokens=200).with_structured_output(Weather, method=method)
    answer = structured.invoke([("user", "What is the weather in Oslo?")])
    assert isinstance(answer, Weather)


# -- handles ---------------------------------------------------------------------------------


async def test_handle_calls_take_the_same_formats(serve_url):
    handle = serve.get_app_handle("llava")
    body = ask(response_format=json_schema_format("person", schemas.PERSON), temperature=1.0, seed=9)
    answer = await handle.chat.remote(body)
    jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), schemas.PERSON)
    tools = {
        "tools": weather_tools(),
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    chunks = [c async for c in handle.options(stream=True).chat_stream.remote(ask(stream=True, **tools))]
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", []) if c["choices"]]
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"].startswith("call_")
    Weather.model_validate_json("".join(d["function"]["arguments"] for d in deltas))
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_the_official_client_s_tool_loop_completes_with_the_result_in_the_prompt(client, processor, hf_model):
    """A forced call, its result sent back as a `tool` message, and a final answer, in one
    conversation; the final answer equals `generate` on the history in the README's plain-text
    form (LLaVA chat templates have no tool format)."""
    question = {"role": "user", "content": "What is the weather in Paris?"}
    forced = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(
        model="llava-tiny", messages=[question], tools=weather_tools(), tool_choice=forced, max_tokens=200
    )
    (call,) = first.choices[0].message.tool_calls
    result = '{"temperature_c": 21}'
    history = [
        question,
        first.choices[0].message,
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    final = client.chat.completions.create(
        model="llava-tiny",
        messages=history,
        tools=weather_tools(),
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    as_rendered = [
        question,
        {"role": "assistant", "content": f"Called get_weather({call.function.arguments})."},
        {"role": "user", "content": f"Result of get_weather (call {call.id}): {result}"},
    ]
    expected, prompt_tokens = hf_greedy(processor, hf_model, as_rendered, [], 8)
    assert final.choices[0].message.content == expected
    assert final.usage.prompt_tokens == prompt_tokens


def test_langchains_agent_calls_its_tool_and_answers_with_the_result(serve_url):
    """LangChain's agent sends `tool_choice` 'auto' with its tools: the first answer is a call,
    and once the tool's result is in the conversation the answer is text, so the loop ends."""
    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.tools import tool

    calls: list[dict] = []

    @tool("get_weather", args_schema=Weather)
    def get_weather(city: str, unit: str) -> str:
        """Look up the weather in a city."""
        calls.append({"city": city, "unit": unit})
        return "21 degrees"

    agent = create_agent(langchain_llm(serve_url, max_tokens=60), tools=[get_weather])
    result = agent.invoke({"messages": [("user", "What is the weather in Oslo?")]})
    _, called, answered, final = result["messages"]
    assert isinstance(called, AIMessage) and [c["name"] for c in called.tool_calls] == ["get_weather"]
    assert len(calls) == 1 and Weather.model_validate(calls[0])
    assert isinstance(answered, ToolMessage) and answered.content == "21 degrees"
    assert isinstance(final, AIMessage) and not final.tool_calls and final.content


def test_a_tool_message_must_name_the_call_it_answers(serve_url):
    body = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}],
        "max_tokens": 2,
    }
    r = httpx.post(f"{serve_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and "tool_call_id" in r.json()["error"]["message"], r.text
