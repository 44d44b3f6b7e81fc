"""Forced tool calls read back out of an answer, piece by piece."""

import json

import jsonschema
import pytest
from pydantic import BaseModel, create_model

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


def test_nested_models_in_several_functions_keep_their_references():
    """pydantic's `$defs` (what the Agents SDK sends for a model argument) move to the document's
    root under each function's own names, so two functions' `Weather` do not collide."""

    class Weather(BaseModel):
        city: str

    class Other(BaseModel):
        days: int

    def takes(model: type[BaseModel]) -> dict:
        return create_model("Args", weather=(model, ...)).model_json_schema()

    first, second = takes(Weather), takes(Other)
    assert "$defs" in first  # the case under test: references into the parameters' own root
    fmt = call_format({"now": first, "later": second}, ToolCallFormat(("now", "later"), wrapped=True))
    schema = json.loads(fmt.schema_json)
    jsonschema.validate({"name": "now", "arguments": {"weather": {"city": "Oslo"}}}, schema)
    jsonschema.validate({"name": "later", "arguments": {"weather": {"days": 3}}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "now", "arguments": {"weather": {"days": 3}}}, schema)
