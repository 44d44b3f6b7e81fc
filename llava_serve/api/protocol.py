"""The OpenAI Chat Completions wire protocol as pydantic models.

Requests forbid unknown fields: a parameter we do not implement is refused with its name,
never silently ignored. An explicit `null` is read as "not given", for every field, known or
not: SDKs and proxies send `"n": null`, `"tools": null`, ... for parameters the caller never set.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

# Temperatures this close to 0 divide logits into overflow; they mean greedy (as in vLLM).
GREEDY_BELOW = 1e-5


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class ImageURL(_Request):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Request):
    url: str = Field(min_length=1)


class VideoPart(_Request):
    """An extension (vLLM's shape): a clip for models that take video (LLaVA-OneVision)."""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class HistoryFunction(_Request):
    model_config = ConfigDict(extra="ignore")  # replayed histories carry what each client kept

    name: str
    arguments: str


class HistoryToolCall(_Request):
    """A call an assistant turn made, as the official clients replay it."""

    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: HistoryFunction


class ChatMessage(_Request):
    # `developer` is what the official clients send in place of `system` for newer models.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)] | None = Field(
        None, validate_default=True
    )
    name: str | None = None
    # What assistant turns in a replayed history carry: a refusal is accepted and not rendered;
    # tool calls, and the `tool` messages answering them, are rendered (`api.messages`).
    refusal: str | None = None
    tool_calls: list[HistoryToolCall] | None = Field(None, max_length=128)
    tool_call_id: str | None = None  # of a `tool` message: the call it answers

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, v: str) -> str:
        return "system" if v == "developer" else v

    @field_validator("content")
    @classmethod
    def _content_required(cls, v, info: ValidationInfo):
        role = info.data.get("role")
        if v is None and role != "assistant":
            raise ValueError(f"Field required: content is required in {role} messages")
        if role == "tool" and isinstance(v, list) and any(not isinstance(p, TextPart) for p in v):
            raise ValueError("a tool message's content is text")
        return v

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def parts(self) -> list[TextPart | ImagePart | VideoPart]:
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [TextPart(type="text", text=self.content)]
        return list(self.content)


class StreamOptions(_Request):
    include_usage: bool = False


_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class JSONSchemaFormat(_Request):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=_NAME)
    description: str | None = None
    # `schema` would shadow a BaseModel attribute; absent means any JSON value.
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    # Accepted for compatibility: every schema is enforced by the grammar, strict or not.
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and allowed with no other type")
        return self


class FunctionDefinition(_Request):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


def _as_list(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions body."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description=f"Below {GREEDY_BELOW} the answer is greedy, as with 0."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="Extension: sample from the k most likely tokens.")
    stop: str | list[str] | None = None
    # The range torch's generators accept; anything else would fail inside the sampler.
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(
        None, ge=0.01, le=10.0, description="Extension, as transformers: >1 discourages tokens seen so far."
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias from -100 to 100, added to the logits."
    )
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's sampling extensions, with vLLM's meanings (what its clients and benchmark send).
    min_p: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Extension (vLLM): drop tokens below min_p x the likeliest's probability.",
    )
    ignore_eos: bool | None = Field(
        None, description="Extension (vLLM): end-of-sequence does not end the answer; it runs to max_tokens."
    )
    min_tokens: int | None = Field(
        None,
        ge=0,
        description="Extension (vLLM): no end-of-sequence, stop token or stop string before this many.",
    )
    stop_token_ids: list[int] | None = Field(
        None,
        max_length=64,
        description="Extension (vLLM): token ids that end the answer as end-of-sequence does.",
    )
    include_stop_str_in_output: bool | None = Field(
        None, description="Extension (vLLM): the stop string or stop token that ended the answer stays in it."
    )
    skip_special_tokens: bool | None = Field(
        None, description="Extension (vLLM): leave special tokens out of the text (default true)."
    )
    n: int = Field(
        1,
        ge=1,
        description="Answers to generate (up to generation.max_n). They share the prompt's prefill; "
        "each samples with its own seed, derived from `seed` when one is given.",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description="'required' or a named function constrain the answer to a call; 'none' is text. "
        "'auto' (the default when tools are given): a call of one of the tools until a tool result "
        "follows the last user message, then text (LLaVA chat templates have no tool format, so the "
        "model cannot choose; this is what lets an agent's call, result, answer loop finish).",
    )
    # One call is made per answer, so parallel calls are never produced whatever this says.
    parallel_tool_calls: bool | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = _as_list(v)
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            # ASCII digits only, and no longer than any vocabulary's ids: `str.isdigit` is true of
            # "²" and Arabic-Indic digits, and int() refuses strings past 4300 digits.
            if not (key.isascii() and key.isdigit() and len(key) <= 9):
                raise ValueError(f"logit_bias keys are token ids; {key!r} is not one")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values lie in [-100, 100]; token {key} has {bias}")
        if v is not None and len(v) > 1024:
            raise ValueError("logit_bias takes at most 1024 tokens")
        return v

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("function names must be unique")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, choice, info: ValidationInfo):
        names = [t.function.name for t in info.data.get("tools") or ()]
        if choice is not None and choice != "none" and not names:
            raise ValueError("a tool choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"function {choice.function.name!r} is not among the tools")
        fmt = info.data.get("response_format")
        forced = choice == "required" or isinstance(choice, NamedToolChoice)
        if forced and fmt is not None and fmt.type != "text":
            raise ValueError("a forced tool call already fixes the answer's format; drop response_format")
        return choice

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs: true")
        return v

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        users = [m for m in self.messages if m.role == "user"]
        if not users:
            raise ValueError("messages must contain at least one user message")
        if not any(p.type != "text" or p.text.strip() for m in users for p in m.parts()):
            raise ValueError("the user messages carry no text and no image: there is nothing to answer")
        return self

    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    def awaits_tool_call(self) -> bool:
        """Under `tool_choice` 'auto': no tool result follows the last user message yet."""
        for message in reversed(self.messages):
            if message.role in ("user", "tool"):
                return message.role == "user"
        return True

    def stop_list(self) -> list[str]:
        return _as_list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- responses ---------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV was reused from an earlier request, not computed


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_no_calls(self, handler):
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class _Sparse(BaseModel):
    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        # OpenAI sends only the keys a delta carries ({"content": "..."}), never "role": null.
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionCallDelta(_Sparse):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Sparse):
    index: int = 0
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(_Sparse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class TokenizeRequest(_Request):
    """POST /tokenize body, in vLLM's shape: a `prompt` (tokenized as the tokenizer does), or chat
    `messages`, whose ids are what the model is given for them, each image's placeholder
    expanded to the tokens the model counts for it."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(
        True, description="For a prompt: the tokenizer's BOS/EOS around it. Messages: ignored."
    )
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    """POST /detokenize body, in vLLM's shape."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llava-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
