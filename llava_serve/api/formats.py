"""From a chat request to the format its answer must take."""

from __future__ import annotations

from llava_serve.api.protocol import ChatCompletionRequest, NamedToolChoice
from llava_serve.structured.spec import JSON_OBJECT, OutputFormat, ToolCallFormat
from llava_serve.structured.tools import call_format


def tool_call_format(request: ChatCompletionRequest) -> ToolCallFormat | None:
    """How the answer's call is written (a named function's arguments alone, or a choice of the
    offered ones), or None when the answer is not a call: `tool_choice` 'none', or 'auto' once
    a tool result answers the last user message."""
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        return ToolCallFormat((choice.function.name,), wrapped=False)
    auto = choice in (None, "auto") and request.tools is not None and request.awaits_tool_call()
    if choice == "required" or auto:
        return ToolCallFormat(tuple(t.function.name for t in request.tools or ()), wrapped=True)
    return None


def output_format(request: ChatCompletionRequest) -> OutputFormat | None:
    """None for free text; a call wins over `response_format` (forcing both is refused; under
    'auto' the format holds once the call has been answered)."""
    if (call := tool_call_format(request)) is not None:
        return call_format({t.function.name: t.function.parameters for t in request.tools or ()}, call)
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JSON_OBJECT
    return OutputFormat.from_schema(fmt.json_schema.schema_, "response_format.json_schema.schema")
