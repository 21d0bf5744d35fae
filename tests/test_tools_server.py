"""Function calling, structured outputs and reasoning on the real server with SmolLM2 (hermes tools, <think>)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import LocalRenderer, RunningServer

pytestmark = pytest.mark.server

MODEL = "smollm2-135m-instruct"
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                      "parameters": {"type": "object", "properties": {"tz": {"type": "string",
                                                                                             "maxLength": 30}},
                                                     "required": ["tz"]}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=300)


def post(server: RunningServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=server.headers, timeout=300)


def assemble(stream: Any) -> tuple[dict[str, Any], list[Any]]:
    """What a client builds from the chunks: content, reasoning, calls by index, finish reason."""
    out: dict[str, Any] = {"content": None, "reasoning": None, "calls": {}, "finish": None}
    chunks = list(stream)
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        if delta.content:
            out["content"] = (out["content"] or "") + delta.content
        extra = delta.model_extra or {}
        if extra.get("reasoning"):
            out["reasoning"] = (out["reasoning"] or "") + extra["reasoning"]
        for call in delta.tool_calls or []:
            entry = out["calls"].setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            if call.id is not None:
                assert entry["id"] is None, "id is sent once per call"
                entry["id"], entry["name"] = call.id, call.function.name
                assert call.type == "function"
            else:
                assert call.function.name is None, "later deltas carry only argument fragments"
            entry["arguments"] += call.function.arguments or ""
        if choice.finish_reason:
            out["finish"] = choice.finish_reason
    return out, chunks


def calls_of(message: Any) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


# ----------------------------------------------------------------------------------------------------------------
# tool calls


def test_required_tool_call_validates_against_schema(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_streamed_tool_call_equals_non_streamed(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80)
    full = client.chat.completions.create(**kwargs)
    streamed, chunks = assemble(client.chat.completions.create(**kwargs, stream=True))
    assert streamed["finish"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed["calls"].values()] == calls_of(full.choices[0].message)
    first_call_chunk = next(c for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    first = first_call_chunk.choices[0].delta.tool_calls[0]
    assert first.index == 0 and first.id and first.function.name
    json.loads(streamed["calls"][0]["arguments"])  # the fragments concatenate to exactly the arguments JSON


def test_named_tool_choice_ends_with_stop(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert r.choices[0].finish_reason == "stop"  # as OpenAI does for a named choice
    ((name, arguments),) = calls_of(r.choices[0].message)
    assert name == "get_time"
    jsonschema.validate(json.loads(arguments), TOOLS[1]["function"]["parameters"])


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=20)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_tool_round_trip(client: openai.OpenAI, server: RunningServer) -> None:
    """call -> tool result -> final answer; the template has no tool support, so tools go in the system prompt."""
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=80)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=40)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the history is in the prompt: the tool's result and the assistant's call were rendered
    local = LocalRenderer(server.spec)
    ids = local.prompt(history, tools=TOOLS)
    text = local.tokenizer.decode(ids)
    assert "<tool_response>" in text and '"temperature": 21' in text and "<tool_call>" in text
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert final.usage.prompt_tokens == len(ids)


# ----------------------------------------------------------------------------------------------------------------
# structured outputs

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


def test_json_schema_response_validates(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "Describe a person."}],
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    r = client.chat.completions.create(**kwargs)
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    streamed, _ = assemble(client.chat.completions.create(**kwargs, stream=True))
    assert streamed["content"] == r.choices[0].message.content


def test_json_object_response(client: openai.OpenAI) -> None:
    """Any JSON object: the grammar fixes the shape, not the length, so a 135M model may nest until max_tokens."""
    r = client.chat.completions.create(model=MODEL, max_tokens=60, response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "Is Paris in France? Answer in JSON."}])
    content = r.choices[0].message.content
    assert content.startswith("{"), content
    if r.choices[0].finish_reason == "stop":  # the grammar ended the object
        assert isinstance(json.loads(content), dict)


def test_legacy_guided_fields_are_enforced(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, max_tokens=10, messages=ASK,
                                       extra_body={"guided_choice": ["sunny", "rainy"]})
    assert r.choices[0].message.content in ("sunny", "rainy")
    for schema in (PERSON, json.dumps(PERSON)):  # vLLM also took the schema as JSON text
        r = client.chat.completions.create(model=MODEL, max_tokens=60, messages=ASK,
                                           extra_body={"guided_json": schema})
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = client.chat.completions.create(model=MODEL, max_tokens=10, messages=ASK,
                                       extra_body={"guided_regex": "[0-9]{3}"})
    assert len(r.choices[0].message.content) == 3 and r.choices[0].message.content.isdigit()


# ----------------------------------------------------------------------------------------------------------------
# reasoning (the server runs SmolLM2 with the <think> parser)

THINK_REGEX = "<think>[a-z][a-z ]{0,39}</think>[A-Z][a-z ]{1,30}[.]"  # words, not only blanks


def test_forced_thinking_is_split_from_the_answer(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "Capital of France?"}],
                  extra_body={"structured_outputs": {"regex": THINK_REGEX}})
    r = client.chat.completions.create(**kwargs)
    message = r.choices[0].message
    reasoning = message.model_extra["reasoning"]
    assert message.model_extra["reasoning_content"] == reasoning  # the server runs with --reasoning-content
    assert reasoning and "<think>" not in reasoning and "</think>" not in (message.content or "")
    assert message.content and message.content[0].isupper() and message.content.endswith(".")
    streamed, chunks = assemble(client.chat.completions.create(**kwargs, stream=True))
    assert (streamed["reasoning"], streamed["content"]) == (reasoning, message.content)
    kinds = [("r" if (c.choices[0].delta.model_extra or {}).get("reasoning") else "c")
             for c in chunks if c.choices and ((c.choices[0].delta.model_extra or {}).get("reasoning")
                                               or c.choices[0].delta.content)]
    assert kinds == sorted(kinds, reverse=True)  # all reasoning deltas come before the answer's


def test_include_reasoning_false_drops_it(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"structured_outputs": {"regex": THINK_REGEX},
                                                   "include_reasoning": False})
    assert "reasoning" not in (r.choices[0].message.model_extra or {}) and r.choices[0].message.content


def test_thinking_budget_closes_the_thinking(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, max_tokens=30, messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"max_reasoning_tokens": 6})
    message = r.choices[0].message
    assert message.model_extra["reasoning"]  # the server opened the thinking...
    assert message.content  # ...closed it after 6 tokens and the model answered
    assert r.usage.completion_tokens <= 30
    none = client.chat.completions.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "Hi"}],
                                          reasoning_effort="none")
    assert "reasoning" not in (none.choices[0].message.model_extra or {}) and none.choices[0].message.content


def test_reasoning_in_history_is_accepted(client: openai.OpenAI) -> None:
    history = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
               {"role": "user", "content": "Bye"}]
    r = client.chat.completions.create(model=MODEL, max_tokens=5, messages=history)
    assert r.choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------------------------------------------
# bad input

FN = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
BAD = [
    ({"tools": []}, "tools"),
    ({"tools": [FN], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [FN, FN]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "tools": [FN]}, "response_format"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    # the grammar backend refuses these: 400 before any response starts, even when streaming
    ({"structured_outputs": {"regex": "("}, "stream": True}, "structured_outputs"),
    ({"guided_grammar": "root ::= nonsense ("}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"max_reasoning_tokens": 5, "thinking_token_budget": 5}, "thinking_token_budget"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
]


@pytest.mark.parametrize(("extra", "param"), BAD)
def test_bad_tool_and_format_requests_are_400(server: RunningServer, extra: dict[str, Any], param: str) -> None:
    r = post(server, {"model": MODEL, "messages": ASK, "max_tokens": 5} | extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_model_without_tool_format_refuses_tools(server: RunningServer) -> None:
    import dataclasses

    from serve.errors import APIError
    from serve.protocol import ChatCompletionRequest
    from serve.tools import check_tool_request

    spec = dataclasses.replace(server.spec, tool_format=None)
    req = ChatCompletionRequest.model_validate({"model": MODEL, "messages": ASK, "tools": [FN]})
    with pytest.raises(APIError) as err:
        check_tool_request(req, spec, spec.tool_format)
    assert err.value.status == 400 and err.value.param == "tools" and "cannot call tools" in err.value.message
