"""Mistral formats on tiny random models with real Tekken tokenizers: pre-v11 calls (tiny-mistral, Tekken v3) and
v11 calls + [THINK] reasoning (tiny-ministral3, Tekken v13). The weights are noise, so every call and every thinking
section here is produced by the server's steering (forced markers + grammar), which is what these tests check."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import LocalRenderer, RunningServer
from tests.test_tools_server import assemble

pytestmark = pytest.mark.server

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time", "description": "Time",
                                           "parameters": {"type": "object", "properties": {
                                               "hour": {"type": "integer", "minimum": 0, "maximum": 23}},
                                               "required": ["hour"], "additionalProperties": False}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
HISTORY = [*ASK,
           {"role": "assistant", "content": None, "reasoning_content": "the user wants weather",
            "tool_calls": [{"id": "call_0123456789abcdef", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "call_0123456789abcdef", "content": '{"temp": 21}'}]


def client_for(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


# Both engines: vLLM, and llama.cpp on the GGUF export (Tekken vocabulary, [TOOL_CALLS]/[THINK] kept in the text).
MISTRAL_SERVERS = ["tiny_server", "ministral_server", "tiny_llamacpp_server", "ministral_llamacpp_server"]
MINISTRAL_SERVERS = ["ministral_server", "ministral_llamacpp_server"]


def check_calls(message: Any) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert len(call.id) == 9 and call.id.isalnum()  # Mistral's id format
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("fixture", MISTRAL_SERVERS)
def test_prompt_carries_mistral_tool_tokens(fixture: str, request: pytest.FixtureRequest) -> None:
    server: RunningServer = request.getfixturevalue(fixture)
    local = LocalRenderer(server.spec)
    ids = local.prompt(HISTORY, tools=TOOLS)
    tok = local.tokenizer
    specials = {name: tok.encode_piece(name)[0] for name in ("[AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]")}
    assert all(tid in ids for tid in specials.values()), specials
    if server.spec.reasoning_format == "mistral-think":  # earlier thinking goes back in as [THINK]...[/THINK]
        assert tok.encode_piece("[THINK]")[0] in ids
    # the server renders the same prompt: an OpenAI-style call id was mapped to Mistral's 9 characters
    r = client_for(server).chat.completions.create(model=server.spec.name, messages=HISTORY, tools=TOOLS,
                                                   max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("fixture", MISTRAL_SERVERS)
def test_required_call_streamed_and_not(fixture: str, request: pytest.FixtureRequest) -> None:
    server: RunningServer = request.getfixturevalue(fixture)
    client = client_for(server)
    kwargs = dict(model=server.spec.name, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=60,
                  temperature=0, parallel_tool_calls=False)
    full = client.chat.completions.create(**kwargs)
    assert full.choices[0].finish_reason == "tool_calls"
    check_calls(full.choices[0].message)
    streamed, _ = assemble(client.chat.completions.create(**kwargs, stream=True))
    assert streamed["finish"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed["calls"].values()] == [
        (c.function.name, c.function.arguments) for c in full.choices[0].message.tool_calls]


@pytest.mark.parametrize("fixture", MISTRAL_SERVERS)
def test_named_call(fixture: str, request: pytest.FixtureRequest) -> None:
    server: RunningServer = request.getfixturevalue(fixture)
    r = client_for(server).chat.completions.create(
        model=server.spec.name, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert r.choices[0].finish_reason == "stop"
    check_calls(r.choices[0].message)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"]


@pytest.mark.parametrize("fixture", MINISTRAL_SERVERS)
def test_thinking_budget_on_mistral_think(fixture: str, request: pytest.FixtureRequest) -> None:
    """The server writes [THINK], lets the model think for 4 tokens, writes [/THINK], and the model answers.

    The random model only repeats [THINK] (which the parser absorbs), so the check is in the tokens: 12 completion
    tokens of which 10 were sampled (they have logprobs) and 2 are the markers the server wrote.
    """
    client = client_for(request.getfixturevalue(fixture))
    kwargs = dict(model="tiny-ministral3", messages=ASK, max_tokens=12, temperature=0, logprobs=True,
                  extra_body={"max_reasoning_tokens": 4})
    r = client.chat.completions.create(**kwargs)
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    assert len(r.choices[0].logprobs.content) == 10
    streamed, _ = assemble(client.chat.completions.create(**kwargs, stream=True))
    assert (streamed["reasoning"], streamed["content"]) == (r.choices[0].message.model_extra.get("reasoning"),
                                                            r.choices[0].message.content)


@pytest.mark.parametrize("fixture", MINISTRAL_SERVERS)
def test_thinking_then_forced_call(fixture: str, request: pytest.FixtureRequest) -> None:
    """With a budget, the model thinks first; the server then closes the thinking and forces the call."""
    r = client_for(request.getfixturevalue(fixture)).chat.completions.create(
        model="tiny-ministral3", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0,
        logprobs=True, extra_body={"max_reasoning_tokens": 3})
    check_calls(r.choices[0].message)
    assert r.choices[0].finish_reason == "tool_calls"
    # [THINK] + 3 thinking tokens + [/THINK][TOOL_CALLS] + the name chosen + [ARGS] + the arguments
    assert r.usage.completion_tokens - len(r.choices[0].logprobs.content) == 4


def test_reasoning_params_refused_without_reasoning_format(tiny_server: RunningServer) -> None:
    for extra in ({"reasoning_effort": "low"}, {"max_reasoning_tokens": 10}):
        r = httpx.post(f"{tiny_server.base_url}/v1/chat/completions", timeout=60,
                       json={"model": "tiny-mistral", "messages": ASK, "max_tokens": 2} | extra)
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(extra)), r.text
