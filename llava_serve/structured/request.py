"""From a chat request to the format its answer must take."""

from __future__ import annotations

from llava_serve.protocol import ChatCompletionRequest, NamedToolChoice
from llava_serve.structured.spec import JSON_OBJECT, OutputFormat
from llava_serve.structured.tools import call_format


def output_format(request: ChatCompletionRequest) -> OutputFormat | None:
    """None for free text; a forced tool call wins over `response_format` (both are refused)."""
    if request.forces_tool_call():
        functions = {t.function.name: t.function.parameters for t in request.tools or ()}
        choice = request.tool_choice
        return call_format(functions, choice.function.name if isinstance(choice, NamedToolChoice) else None)
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JSON_OBJECT
    return OutputFormat.from_schema(fmt.json_schema.schema_, "response_format.json_schema.schema")
