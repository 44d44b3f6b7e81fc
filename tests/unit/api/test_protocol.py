"""The request shapes real SDKs, proxies and agent frameworks send, parsed as they mean them."""

import pytest

from llava_serve.api.chat import parse_request
from llava_serve.api.formats import tool_call_format
from llava_serve.errors import InvalidRequest
from llava_serve.structured.spec import ToolCallFormat

USER = {"role": "user", "content": "hi"}

# Every known parameter set to null: "not given", as the official clients and LiteLLM send them.
ALL_NULL = {
    "model": None,
    "max_tokens": None,
    "max_completion_tokens": None,
    "temperature": None,
    "top_p": None,
    "top_k": None,
    "stop": None,
    "seed": None,
    "presence_penalty": None,
    "frequency_penalty": None,
    "repetition_penalty": None,
    "logprobs": None,
    "top_logprobs": None,
    "n": None,
    "stream": None,
    "stream_options": None,
    "user": None,
    "response_format": None,
    "tools": None,
    "tool_choice": None,
    "parallel_tool_calls": None,
    "logit_bias": None,
    # A parameter this server does not implement: null still means "not given".
    "functions": None,
}


def test_explicit_nulls_mean_not_given():
    request = parse_request({"messages": [USER], **ALL_NULL})
    assert request == parse_request({"messages": [USER]})
    assert request.n == 1 and request.logprobs is False and request.stream is False


@pytest.mark.parametrize("name", ["functions", "function_call", "made_up"])
def test_unknown_parameters_with_a_value_are_still_refused(name):
    with pytest.raises(InvalidRequest) as info:
        parse_request({"messages": [USER], name: {"type": "json_object"}})
    assert info.value.param == name and "Extra inputs" in info.value.message


def test_nulls_inside_messages_and_parts_mean_not_given():
    request = parse_request(
        {
            "messages": [
                {
                    "role": "user",
                    "name": None,
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:,x", "detail": None}},
                        {"type": "text", "text": "what?"},
                    ],
                }
            ],
            "stream": True,
            "stream_options": {"include_usage": None},
        }
    )
    assert request.messages[0].content[0].image_url.detail is None
    assert request.stream_options.include_usage is False


def test_developer_role_is_system():
    request = parse_request({"messages": [{"role": "developer", "content": "Be terse."}, USER]})
    assert request.messages[0].role == "system"


def test_assistant_history_turns_as_sdks_replay_them():
    request = parse_request(
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                    "name": "bot",
                },
                {"role": "assistant", "content": None},
                USER,
            ]
        }
    )
    assert request.messages[1].parts() == [] and request.messages[2].parts() == []


@pytest.mark.parametrize("role", ["user", "system", "developer"])
def test_content_is_required_outside_assistant_turns(role):
    with pytest.raises(
        InvalidRequest, match=f"content is required in {'system' if role != 'user' else role}"
    ):
        parse_request({"messages": [{"role": role, "content": None}, USER]})


@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**63) - 1])
def test_seed_outside_what_the_sampler_accepts_is_refused(seed):
    with pytest.raises(InvalidRequest) as info:
        parse_request({"messages": [USER], "seed": seed})
    assert info.value.param == "seed"


@pytest.mark.parametrize("seed", [0, 2**64 - 1, -(2**63)])
def test_seed_at_the_limits_is_accepted(seed):
    assert parse_request({"messages": [USER], "seed": seed}).seed == seed


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [TOOL, TOOL], "tool_choice": "required"}, "tools", "unique"),
        (
            {"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "drop response_format",
        ),
        (
            {"response_format": {"type": "text", "json_schema": {"name": "x"}}},
            "response_format",
            "no other type",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "bad name"}}},
            "response_format.json_schema.name",
            "pattern",
        ),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
    ],
)
def test_formats_and_tools_that_cannot_work_are_refused_naming_the_field(extra, param, says):
    with pytest.raises(InvalidRequest) as info:
        parse_request({"messages": [USER], **extra})
    assert info.value.param == param and says in info.value.message, info.value.message


def test_tools_with_tool_choice_none_are_plain_text():
    request = parse_request({"messages": [USER], "tools": [TOOL], "tool_choice": "none"})
    assert not request.forces_tool_call() and tool_call_format(request) is None


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
ANSWERED = [
    USER,
    {"role": "assistant", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "9C"},
]


@pytest.mark.parametrize("choice", [None, "auto"])
def test_auto_is_a_call_until_a_tool_result_answers_the_last_user_message(choice):
    def fmt(messages):
        return tool_call_format(parse_request({"messages": messages, "tools": [TOOL], "tool_choice": choice}))

    assert fmt([USER]) == ToolCallFormat(("get_weather",), wrapped=True)
    assert fmt(ANSWERED) is None
    assert fmt([*ANSWERED, {"role": "assistant", "content": "9C"}, USER]) is not None
