"""Forced tool calls: the schema a call must match, and reading calls back out of the answer.

With `tool_choice` naming a function the model writes that function's arguments object and
nothing else. With `"required"` it writes `{"name": "<function>", "arguments": {...}}`, one
alternative per offered function, in that key order and without whitespace (the grammar allows
no other layout), so a stream can tell the name as soon as it is complete and pass the
arguments on as they are generated.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from llava_serve.structured.spec import OutputFormat, ToolCallFormat, check_schema

_HEAD = re.compile(r'\{"name":"((?:[^"\\]|\\.)*)","arguments":')
ANY_OBJECT = {"type": "object"}


def call_format(functions: dict[str, dict | None], call: ToolCallFormat) -> OutputFormat:
    """The output format for a forced call of one of `call.names` (`functions`: name ->
    parameters schema; None takes any object), each schema checked on its own so an error names
    the function."""
    for name, params in functions.items():
        if params is not None:
            check_schema(params, f"tools[{name}].function.parameters")
    if not call.wrapped:
        return OutputFormat.from_schema(functions[call.names[0]] or ANY_OBJECT, "tools", call)
    alternatives, defs = [], {}
    for name, params in functions.items():
        arguments, own = _hoisted(name, params or ANY_OBJECT)
        defs |= own
        alternatives.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": arguments},
                "required": ["name", "arguments"],
            }
        )
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    if defs:
        schema = {**schema, "$defs": defs}
    return OutputFormat.from_schema(schema, "tools", call)


def _hoisted(name: str, params: dict) -> tuple[dict, dict]:
    """A function's parameters nested under the call, and its `$defs` (pydantic's nested models,
    which the Agents SDK and LangChain send) moved to the root under names of its own: the
    schema's `#/$defs/X` references point at its root, which is no longer the document's."""
    own = {**params.get("definitions", {}), **params.get("$defs", {})}
    if not own:
        return params, {}
    prefix = f"{name}__"

    def moved(node):
        if isinstance(node, dict):
            out = {k: moved(v) for k, v in node.items() if k not in ("$defs", "definitions")}
            ref = node.get("$ref")
            if isinstance(ref, str):
                for root in ("#/$defs/", "#/definitions/"):
                    if ref.startswith(root):
                        out["$ref"] = f"#/$defs/{prefix}{ref[len(root) :]}"
            return out
        if isinstance(node, list):
            return [moved(v) for v in node]
        return node

    return moved(params), {prefix + key: moved(value) for key, value in own.items()}


@dataclass
class CallUpdate:
    """What a stream should send for the call so far: its header once (id, name), then pieces of
    the arguments text."""

    name: str | None = None
    call_id: str | None = None
    arguments: str = ""


@dataclass
class ToolCallReader:
    """Reads one call out of an answer's text as it arrives (`feed`), then at its end (`finish`)."""

    format: ToolCallFormat
    call_id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    name: str | None = None
    arguments: str = ""
    _held: str = ""
    _announced: bool = False  # the header (id, name) has gone out

    def __post_init__(self):
        if not self.format.wrapped:
            self.name = self.format.names[0]

    def feed(self, text: str) -> CallUpdate | None:
        """The part of the call `text` completes, or None while nothing new can be said."""
        header = not self._announced
        self._held += text
        if self.name is None:
            match = _HEAD.match(self._held)
            if match is None:
                return None
            self.name = json.loads(f'"{match.group(1)}"')
            self._held = self._held[match.end() :]
        # A wrapped call ends with the wrapper's "}", which is not part of the arguments: hold the
        # last character back until the answer ends.
        keep = 1 if self.format.wrapped else 0
        piece, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        self.arguments += piece
        if not (piece or header):
            return None
        self._announced = True
        return CallUpdate(self.name if header else None, self.call_id if header else None, piece)

    def finish(self, complete: bool) -> CallUpdate | None:
        """At the end of the answer: a complete wrapped call drops the wrapper's "}"; a call cut
        short (`max_tokens`) passes on whatever arguments it had."""
        if self.name is None:  # cut (max_tokens) before the name was complete: there is no call
            return None
        rest = "" if complete and self.format.wrapped else self._held
        self._held = ""
        self.arguments += rest
        return CallUpdate(arguments=rest) if rest else None
