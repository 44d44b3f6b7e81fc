"""What shape a request's answer must take, from its `response_format`, `tools` and `tool_choice`.

Built in the ingress (no grammar library needed there): a schema that is not a valid JSON
Schema is refused before any replica sees it. The result travels with the sampling parameters to
the model replica, which compiles it (`llava_serve.structured.grammar`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema

from llava_serve.errors import InvalidRequest


@dataclass(frozen=True)
class ToolCallFormat:
    """The answer is a call of one of `names`: the arguments object alone when a function is
    named (`wrapped` False), else `{"name": ..., "arguments": {...}}`."""

    names: tuple[str, ...]
    wrapped: bool


@dataclass(frozen=True)
class OutputFormat:
    """A JSON Schema the answer must match, serialized compactly (its hash keys the grammar
    cache), and how to read the answer back when it is a tool call."""

    schema_json: str
    tool_call: ToolCallFormat | None = None
    param: str = "response_format"  # the request field the schema came from, for errors

    @property
    def key(self) -> str:
        return hashlib.sha256(self.schema_json.encode()).hexdigest()

    @classmethod
    def from_schema(cls, schema: dict, param: str, tool_call: ToolCallFormat | None = None) -> OutputFormat:
        check_schema(schema, param)
        try:
            # Key order is kept: properties are generated in the order the schema lists them.
            return cls(json.dumps(closed(schema), separators=(",", ":")), tool_call, param)
        except RecursionError:
            raise InvalidRequest(f"{param}: the schema nests too deeply", param) from None


# The `json_object` format: any JSON object.
JSON_OBJECT = OutputFormat('{"type":"object"}')


def check_schema(schema: Any, param: str) -> None:
    """Refuse what is not a JSON Schema (draft 2020-12), naming the offending keyword."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param}: a JSON Schema must be an object", param)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except RecursionError:
        raise InvalidRequest(f"{param}: the schema nests too deeply", param) from None
    except (OverflowError, re.error) as e:  # a `pattern` the regex engine cannot compile
        raise InvalidRequest(f"{param}: a pattern in the schema cannot be compiled: {e}", param) from None
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise InvalidRequest(f"{param}: invalid JSON Schema at {where}: {e.message}", param) from None


_VALUES = {"const", "enum", "default", "examples"}  # keywords whose values are data, not schemas


def closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that declares `properties` and
    says nothing about others: an answer that only uses the declared properties still matches
    the schema, and a model must not be free to add properties forever (OpenAI's strict mode
    asks callers to write the same)."""

    def visit(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: v if k in _VALUES else visit(v) for k, v in node.items()}
            declared = "properties" in node and isinstance(node["properties"], dict)
            if declared and "additionalProperties" not in node and "patternProperties" not in node:
                node["additionalProperties"] = False
            return node
        if isinstance(node, list):
            return [visit(v) for v in node]
        return node

    return visit(copy.deepcopy(schema))
