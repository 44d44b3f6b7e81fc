"""What a request body may hold, checked before the work it would cause: first on the raw bytes
(how many JSON values, by counting separators as they arrive, in the HTTP guard), then on the parsed
JSON (messages, content parts, text, tools, and each schema's size and node count), before
pydantic builds the request or a schema is compiled. Callers run this off the event loop: the
checks are linear in the body and bounded by `limits.max_request_bytes`."""

from __future__ import annotations

import json
from typing import Any

from llava_serve.config import LimitsConfig
from llava_serve.errors import InvalidRequest, RequestTooLarge


def json_values(chunk: bytes) -> int:
    """At most how many JSON values `chunk` of a body starts: every value but the first follows a
    comma or opens a container, so counting those bytes (memchr-fast; base64 image data holds
    none) bounds the parser's work from above, chunk by chunk as the body arrives."""
    return chunk.count(b",") + chunk.count(b"{") + chunk.count(b"[")


def too_many_values(limits: LimitsConfig) -> RequestTooLarge:
    return RequestTooLarge(
        f"request body holds over {limits.max_json_values} JSON values, this server's limit "
        "(limits.max_json_values)",
        None,
        "request_too_complex",
    )


def decode_body(raw: bytes) -> Any:
    """The JSON of a request body whose values were counted as it arrived (`json_values`)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise InvalidRequest("request body nests too deeply to parse", None, "invalid_json") from None
    except ValueError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}", None, "invalid_json") from None


def check_shape(body: Any, limits: LimitsConfig) -> None:
    """Counts of a parsed chat request against `limits`, each refusal naming its field and knob.
    Anything not of the expected shape is left to the request model's own validation."""
    if not isinstance(body, dict):
        return
    messages = body.get("messages")
    if isinstance(messages, list):
        _at_most(len(messages), limits.max_messages, "messages", "messages", "max_messages")
        parts = chars = 0
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                parts += len(content)
                chars += sum(
                    len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
        _at_most(parts, limits.max_content_parts, "content parts", "messages", "max_content_parts")
        _at_most(chars, limits.max_text_chars, "characters of text", "messages", "max_text_chars")
    tools = body.get("tools")
    if isinstance(tools, list):
        _at_most(len(tools), limits.max_tools, "tools", "tools", "max_tools")
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and "parameters" in function:
                _check_schema_size(function["parameters"], f"tools[{i}].function.parameters", limits)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict) and "schema" in fmt["json_schema"]:
        _check_schema_size(fmt["json_schema"]["schema"], "response_format.json_schema.schema", limits)


def _check_schema_size(schema: Any, param: str, limits: LimitsConfig) -> None:
    size = len(json.dumps(schema, separators=(",", ":")))
    _at_most(size, limits.max_schema_bytes, "bytes of schema", param, "max_schema_bytes")
    nodes, stack = 0, [schema]
    while stack:
        node = stack.pop()
        nodes += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    _at_most(nodes, limits.max_schema_nodes, "schema nodes", param, "max_schema_nodes")


def _at_most(count: int, limit: int, what: str, param: str, knob: str) -> None:
    if count > limit:
        raise InvalidRequest(
            f"{param}: {count} {what}, over this server's limit of {limit} (limits.{knob})",
            param,
            "request_too_complex",
        )
