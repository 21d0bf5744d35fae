"""Output parsers: known outputs split as users expect, and streaming (any split) equals parsing whole."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.formats import mistral_tool_call_id
from serve.parsers import OutputParser, ParsedMessage, ToolCall, parse_whole


def _ids() -> object:
    counter = iter(range(10**6))
    return lambda: f"id{next(counter)}"


def whole(text: str, reasoning: str | None, tools: str | None) -> ParsedMessage:
    return parse_whole(text, reasoning, tools, new_id=_ids())  # type: ignore[arg-type]


def streamed(pieces: list[str], reasoning: str | None, tools: str | None) -> ParsedMessage:
    parser = OutputParser(reasoning, tools, new_id=_ids())  # type: ignore[arg-type]
    message = ParsedMessage()
    for piece in pieces:
        message.add(parser.feed(piece))
    message.add(parser.finish())
    return message


CASES = [
    # (raw output, reasoning format, tool format, reasoning, content, [(name, arguments)])
    ("[THINK]plan it[/THINK]Answer.", "mistral-think", "mistral-v11", "plan it", "Answer.", []),
    ("[THINK]plan only", "mistral-think", "mistral-v11", "plan only", None, []),
    ("no thinking at all", "mistral-think", None, None, "no thinking at all", []),
    ("stray end[/THINK] marker", "mistral-think", None, None, "stray end marker", []),
    ('Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "mistral-think", "mistral-v11", None, "Sure.",
     [("get_weather", '{"city": "Paris"}')]),
    ('[THINK]w[/THINK][TOOL_CALLS]f[ARGS]{"c": "Paris"}[TOOL_CALLS]f[ARGS]{"c": "Rome"}', "mistral-think",
     "mistral-v11", "w", None, [("f", '{"c": "Paris"}'), ("f", '{"c": "Rome"}')]),
    # a call inside the thinking ends it; text after the first complete JSON is not part of the arguments
    ('[THINK]need weather[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"} trailing', "mistral-think", "mistral-v11",
     "need weather", None, [("get_weather", '{"city": "Oslo"}')]),
    ('[TOOL_CALLS]f[CALL_ID]a1b2c3d4e[ARGS]{"x": [1, {"y": "}"}]}', None, "mistral-v11", None, None,
     [("f", '{"x": [1, {"y": "}"}]}')]),
    ('[TOOL_CALLS]f{"x": 1}', None, "mistral-v11", None, None, [("f", '{"x": 1}')]),
    ('\n [TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"arguments": {"y": [1, 2]}, "name": "b"}] junk',
     None, "mistral", None, None, [("a", '{"x": 1}'), ("b", '{"y": [1, 2]}')]),
    ('[TOOL_CALLS]{"name": "a", "arguments": {}}', None, "mistral", None, None, [("a", "{}")]),
    ('<think>\nhmm\n</think>\n\nHi <tool_call>\n{"name": "f", "arguments": {"q": "a\\"}"}}\n</tool_call>\n'
     '<tool_call>{"name":"g","arguments":5, "other": null}</tool_call> end', "think-tags", "hermes", "hmm", "Hi end",
     [("f", '{"q": "a\\"}"}'), ("g", "5")]),
    ('<tool_call>{"name": "f"}</tool_call>', None, "hermes", None, None, [("f", "{}")]),
    ("<tool_call> not json</tool_call>after", None, "hermes", None, "after", []),
    ("<think>a</think>b", None, "hermes", None, "<think>a</think>b", []),  # reasoning off: tags are content
    ("trailing space kept  ", None, "hermes", None, "trailing space kept  ", []),
    ("a < b <tool and <tool_call", None, "hermes", None, "a < b <tool and <tool_call", []),
]


@pytest.mark.parametrize(("raw", "reasoning_format", "tool_format", "reasoning", "content", "calls"), CASES)
def test_known_outputs(raw: str, reasoning_format: str | None, tool_format: str | None, reasoning: str | None,
                       content: str | None, calls: list[tuple[str, str]]) -> None:
    message = whole(raw, reasoning_format, tool_format)
    assert message.reasoning == reasoning
    assert message.content == content
    assert [(c.name, c.arguments) for c in message.tool_calls] == calls
    for call in message.tool_calls:
        json.loads(call.arguments)  # complete calls carry valid JSON


def test_truncated_call_keeps_partial_arguments() -> None:
    message = whole('[TOOL_CALLS]f[ARGS]{"city": "Par', None, "mistral-v11")
    assert message.tool_calls == [ToolCall("id0", "f", '{"city": "Par')]


def test_mistral_ids_are_nine_alphanumerics() -> None:
    ids = {mistral_tool_call_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 9 and i.isalnum() and i.isascii() for i in ids)
    message = parse_whole("[TOOL_CALLS]f[ARGS]{}", None, "mistral-v11")
    assert len(message.tool_calls[0].id) == 9


def test_stream_deltas_name_first_then_fragments() -> None:
    parser = OutputParser(None, "mistral-v11", new_id=lambda: "abcdefghi")
    deltas = [parser.feed(p) for p in ["[TOOL_", "CALLS]get_", "weather[AR", 'GS]{"ci', 'ty": "Paris"}']]
    calls = [c for d in deltas for c in d.tool_calls]
    assert calls[0].id == "abcdefghi" and calls[0].name == "get_weather" and calls[0].arguments == ""
    assert all(c.id is None and c.name is None for c in calls[1:])
    assert "".join(c.arguments for c in calls) == '{"city": "Paris"}'
    assert not any(d.content for d in deltas)  # markers never leak as content


def test_call_id_split_before_args() -> None:
    """Found by the property test: the name must not be taken twice while waiting for [ARGS] after [CALL_ID]."""
    pieces = ["[TOOL_CALLS]f[CALL_ID]a1b2", 'c3d4e[ARGS]{"x": 1}']
    assert streamed(pieces, None, "mistral-v11").tool_calls[0].name == "f"


def _splits(raw: str) -> st.SearchStrategy[list[str]]:
    cuts = st.lists(st.integers(min_value=0, max_value=len(raw)), max_size=12).map(sorted)
    return cuts.map(lambda cs: [raw[a:b] for a, b in zip([0, *cs], [*cs, len(raw)], strict=True)])


@settings(max_examples=400, deadline=None)
@given(data=st.data(), case=st.sampled_from(CASES))
def test_any_split_equals_whole(data: st.DataObject, case: tuple) -> None:
    raw, reasoning_format, tool_format = case[:3]
    pieces = data.draw(_splits(raw))
    assert streamed(pieces, reasoning_format, tool_format) == whole(raw, reasoning_format, tool_format)


_ALPHABET = st.sampled_from(["[THINK]", "[/THINK]", "[TOOL_CALLS]", "[ARGS]", "<think>", "</think>", "<tool_call>",
                             "</tool_call>", "{", "}", "[", "]", '"', ":", ",", " ", "\n", "\\", "a", "name",
                             '"name"', '"arguments"', "1", "x"])


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(_ALPHABET, max_size=40), data=st.data(),
       formats=st.sampled_from([("mistral-think", "mistral-v11"), (None, "mistral"), ("think-tags", "hermes"),
                                ("mistral-think", None), (None, None)]))
def test_random_outputs_any_split_equals_whole(tokens: list[str], data: st.DataObject, formats: tuple) -> None:
    raw = "".join(tokens)
    pieces = data.draw(_splits(raw))
    assert streamed(pieces, *formats) == whole(raw, *formats)
    if formats == (None, None):
        assert (whole(raw, None, None).content or "") == raw  # nothing to parse: text passes through unchanged
