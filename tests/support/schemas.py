"""JSON Schemas the structured-output tests ask for: every kind of constraint the issue names,
each bounded (maxLength, maxItems, numeric ranges, multipleOf, enums): a random-weight model, unlike
a trained one, would otherwise go on writing a string or a fraction's digits until max_tokens."""

from typing import Literal

from pydantic import BaseModel, Field


class Weather(BaseModel):
    """Look up the weather in a city."""

    city: str = Field(max_length=10)
    unit: Literal["celsius", "fahrenheit"]


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 20},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age"],
}
RECEIPT = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "desc": {"type": "string", "maxLength": 8},
                    "price": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.01},
                },
                "required": ["desc", "price"],
            },
        },
        "paid": {"type": "boolean"},
        "currency": {"enum": ["EUR", "USD", "JPY"]},
    },
    "required": ["items", "paid", "currency"],
}
NESTED = {
    "type": "object",
    "properties": {
        "a": {
            "type": "object",
            "properties": {
                "b": {
                    "type": "object",
                    "properties": {"c": {"type": "integer", "minimum": -5, "maximum": 5}},
                    "required": ["c"],
                }
            },
            "required": ["b"],
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 2, "maxItems": 2},
    },
    "required": ["a", "tags"],
}
CHART = {
    "type": "object",
    "properties": {
        "kind": {"type": "string", "enum": ["bar", "line", "pie"]},
        "series": {
            "type": "array",
            "maxItems": 4,
            "items": {"type": "integer", "minimum": 0, "maximum": 1000},
        },
        "title": {"type": ["string", "null"], "maxLength": 10},
        "ratio": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.125},
    },
    "required": ["kind", "series", "ratio"],
}
WEATHER = {  # a tool's parameters
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
}
ALL = {"person": PERSON, "receipt": RECEIPT, "nested": NESTED, "chart": CHART}
