"""Request bodies of the OpenAI API, validated at the edge so bad values become 400s that name the field."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_N = 16
MAX_STOP = 16
MAX_STOP_CHARS = 1024  # per stop string: matching a partial stop across tokens costs its length per token
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows


class _Request(BaseModel):
    # Unknown fields are ignored (clients send `user`, `metadata`, `store`...), as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: Annotated[str, Field(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model's image config decides the size


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(BaseModel):
    data: Annotated[str, Field(min_length=1)]  # base64 of the file's bytes
    format: Literal["wav", "mp3", "flac", "ogg"]


class InputAudioPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURL(BaseModel):
    url: Annotated[str, Field(min_length=1)]


class AudioURLPart(BaseModel):
    type: Literal["audio_url"]  # vLLM's part type
    audio_url: AudioURL


MediaPart = ImagePart | InputAudioPart | AudioURLPart
ContentPart = Annotated[TextPart | ImagePart | InputAudioPart | AudioURLPart, Field(discriminator="type")]
PART_TYPES = ("text", "image_url", "input_audio", "audio_url")


def _check_parts(v: object) -> object:
    """Name the bad part and its field (pydantic would report the union's first member: 'a valid string')."""
    from pydantic import TypeAdapter, ValidationError

    if isinstance(v, list):
        for j, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                raise ValueError(f"content[{j}].type {kind!r} is not a supported content part type "
                                 f"({', '.join(PART_TYPES)})")
            try:
                TypeAdapter(ContentPart).validate_python(part, strict=True)
            except ValidationError as e:
                err = e.errors(include_url=False)[0]
                where = ".".join(str(p) for p in err["loc"][1:])
                raise ValueError(f"content[{j}].{where}: {err['msg']}") from None
    return v


class FunctionCall(BaseModel):
    name: Annotated[str, Field(min_length=1)]
    arguments: str  # a JSON object as text, as OpenAI sends it


class ToolCallIn(BaseModel):
    id: Annotated[str, Field(min_length=1)]
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[ContentPart] | None, BeforeValidator(_check_parts)] = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: which call this result answers
    reasoning: str | None = None  # assistant thinking from an earlier turn
    reasoning_content: str | None = None  # the same, as older clients name it

    @model_validator(mode="after")
    def _roles(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages can have tool_calls")
        return self

    def text(self) -> str:
        """The text parts joined (media parts, if any, are placed by `serve/media.py`)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def media_parts(self) -> list[tuple[int, MediaPart]]:
        """(index in content, part) of each image or audio part."""
        if not isinstance(self.content, list):
            return []
        return [(j, part) for j, part in enumerate(self.content) if not isinstance(part, TextPart)]

    def thinking(self) -> str | None:
        return self.reasoning if self.reasoning is not None else self.reasoning_content


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


def check_json_schema(schema: Any) -> dict[str, Any]:
    """A JSON Schema the grammar compiler can take: a dict that is valid against its metaschema."""
    import jsonschema

    if not isinstance(schema, dict):
        raise ValueError("must be a JSON Schema object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ValueError(f"not a valid JSON Schema: {e.message}") from None
    return schema


def _json_text(value: Any) -> Any:
    """vLLM's guided_json also takes the schema as a JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError("must be a JSON Schema object or its JSON text") from None
    return value


JsonSchemaDict = Annotated[dict[str, Any], BeforeValidator(_json_text), AfterValidator(check_json_schema)]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "response"
    description: str | None = None
    schema_: Annotated[JsonSchemaDict | None, Field(alias="schema")] = None
    strict: bool | None = None  # the schema is always enforced by the grammar, strict or not


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` field: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")
    json_: Annotated[JsonSchemaDict | None, Field(alias="json")] = None
    regex: Annotated[str, Field(min_length=1)] | None = None
    choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
    grammar: Annotated[str, Field(min_length=1)] | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object")
        return self


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: JsonSchemaDict | None = None
    strict: bool | None = None

    def parameters_schema(self) -> dict[str, Any]:
        """No parameters means a call without arguments: `{}`."""
        if self.parameters is None:
            return {"type": "object", "properties": {}, "additionalProperties": False}
        return self.parameters


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]


StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


def _as_list(v: object) -> object:
    if v is not None and not isinstance(v, (str, list)):
        raise ValueError("must be a string or a list of strings")
    return [v] if isinstance(v, str) else v


class SamplingFields(_Request):
    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    # one string or a list; kept as a list so a bad entry is named (`stop.0`) whichever was sent
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP), BeforeValidator(_as_list)] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extension, used by benchmark clients
    min_tokens: Annotated[int, Field(ge=0)] = 0
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be token ids (decimal strings); got {key!r}")
        return v

    def logit_bias_items(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    def stop_list(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # Legacy vLLM fields: translated into structured outputs (vLLM 0.32 ignores them with a log line).
    guided_json: JsonSchemaDict | None = None
    guided_regex: Annotated[str, Field(min_length=1)] | None = None
    guided_choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
    guided_grammar: Annotated[str, Field(min_length=1)] | None = None
    tools: Annotated[list[Tool], Field(min_length=1)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    include_reasoning: bool = True
    reasoning_effort: ReasoningEffort | None = None
    max_reasoning_tokens: Annotated[int, Field(ge=0)] | None = None
    thinking_token_budget: Annotated[int, Field(ge=0)] | None = None  # vLLM's name for max_reasoning_tokens

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def media_parts(self) -> list[tuple[str, MediaPart]]:
        """('messages[i].content[j]', part) for every image and audio part, in prompt order."""
        return [(f"messages[{i}].content[{j}]", part) for i, m in enumerate(self.messages)
                for j, part in m.media_parts()]

    def text_length(self) -> int:
        """Characters the rendered prompt holds at least (contents, earlier calls, tool definitions)."""
        chars = 0
        for m in self.messages:
            chars += len(m.text()) + len(m.thinking() or "")
            chars += sum(len(c.function.name) + len(c.function.arguments) for c in m.tool_calls or ())
        return chars + sum(len(t.function.model_dump_json()) for t in self.tools or ())


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1)]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    suffix: None = None  # insertion is not supported: any value is a 400
    return_tokens_as_token_ids: bool = Field(False, description="vLLM's extension: logprobs name tokens "
                                             "\"token_id:N\" (unambiguous ids, for distillation clients)")
    best_of: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _checks(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.echo and self.stream and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported when streaming")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return p  # type: ignore[return-value]


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt, or the chat form (validated as a chat request), whose rendered ids it returns."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    add_special_tokens: bool = True  # prompt form only
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1 << 20)]


class TranscriptionRequest(_Request):
    """The form fields of /v1/audio/transcriptions and /translations (multipart; the file is read separately)."""

    model: str
    language: Annotated[str, Field(pattern=r"^[a-z]{2}$")] | None = None  # ISO-639-1, as OpenAI takes it
    prompt: str | None = None
    response_format: Literal["json", "text", "verbose_json", "srt", "vtt"] = "json"
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    stream: bool = False
    timestamp_granularities: list[Literal["segment", "word"]] = Field(default_factory=lambda: ["segment"])
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # vLLM's extension; default: the context left

    @field_validator("timestamp_granularities")
    @classmethod
    def _segments_only(cls, v: list[str]) -> list[str]:
        if "word" in v:
            raise ValueError("word timestamps are not supported (segment only)")
        return v

    @field_validator("stream")
    @classmethod
    def _stream_text(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("response_format") not in ("json", "text"):
            raise ValueError("streaming sends text deltas: response_format must be json or text")
        return v
