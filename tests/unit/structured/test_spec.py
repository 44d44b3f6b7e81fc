"""Output formats: schemas checked and closed, and refused naming what is wrong."""

import pytest

from llava_serve.errors import InvalidRequest
from llava_serve.structured.spec import check_schema, closed


def test_objects_that_declare_properties_get_no_others():
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}},
        "$defs": {"open": {"type": "object", "additionalProperties": True, "properties": {}}},
        "examples": [{"properties": {"x": 1}}],
    }
    tight = closed(schema)
    assert tight["additionalProperties"] is False
    assert tight["properties"]["a"]["additionalProperties"] is False
    assert tight["$defs"]["open"]["additionalProperties"] is True  # the caller said so
    assert tight["examples"] == schema["examples"]  # data, not a schema
    assert "additionalProperties" not in schema  # the caller's dict is left alone


@pytest.mark.parametrize(
    ("schema", "names"),
    [
        ({"type": "objectx"}, "objectx"),
        ({"type": "object", "required": "a"}, "required"),
        ([1], "must be an object"),
    ],
)
def test_a_schema_that_is_not_json_schema_is_refused_naming_the_problem(schema, names):
    with pytest.raises(InvalidRequest) as info:
        check_schema(schema, "response_format.json_schema.schema")
    assert names in info.value.message and info.value.param == "response_format.json_schema.schema"
