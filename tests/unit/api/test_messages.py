"""API messages in the template's shape: parts to slots, and tool histories in plain text."""

from llava_serve.api.chat import parse_request
from llava_serve.api.messages import to_template_messages


def test_calls_and_their_results_are_written_as_plain_text_turns():
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
        {"id": "c2", "type": "function", "function": {"name": "time", "arguments": "{}"}, "index": 1},
    ]
    request = parse_request(
        {
            "messages": [
                {"role": "user", "content": "Weather and time in Oslo?"},
                {"role": "assistant", "content": "Let me look.", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "rain"},
                {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "noon"}]},
            ]
        }
    )
    assert to_template_messages(request.messages) == [
        {"role": "user", "content": [{"type": "text", "text": "Weather and time in Oslo?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "text", "text": 'Called weather({"city":"Oslo"}). Called time({}).'},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Result of weather (call c1): rain"},
                {"type": "text", "text": "\n"},
                {"type": "text", "text": "Result of time (call c2): noon"},
            ],
        },
    ]
