"""Forced tool calls read back out of an answer, piece by piece."""

import json

from llava_serve.structured.spec import ToolCallFormat
from llava_serve.structured.tools import ToolCallReader, call_format
from tests.support import schemas


def test_reading_a_call_piece_by_piece_equals_reading_it_whole():
    text = '{"name":"get_weather","arguments":{"city":"Oslo \\"N\\"","unit":"celsius"}}'
    fmt = call_format(
        {"get_weather": schemas.WEATHER, "other": None}, ToolCallFormat(("get_weather", "other"), True)
    ).tool_call
    for size in (1, 3, 7, len(text)):
        reader = ToolCallReader(fmt)
        deltas = [reader.feed(text[i : i + size]) for i in range(0, len(text), size)]
        deltas.append(reader.finish(complete=True))
        assert reader.name == "get_weather"
        assert "".join(d.arguments for d in deltas if d) == json.dumps(
            json.loads(text)["arguments"], separators=(",", ":")
        )
    cut = ToolCallReader(fmt)
    cut.feed('{"name":"get_wea')
    assert cut.finish(complete=False) is None and cut.name is None
