"""Split raw model output into reasoning, content and tool calls, incrementally.

One parser per output: `feed()` takes text pieces as the engine produces them and returns what became certain;
`finish()` flushes the rest. The streaming route sends each result as a delta and the non-streaming route adds them
up, so both give the same message by construction (tests/test_parsers.py checks every split of the input).

Formats (named by the model's registry entry; their markers and call syntax are records in `serve/formats.py`):
- reasoning `think-tags`  `<think>...</think>`;  `mistral-think`  `[THINK]...[/THINK]` (special tokens as text).
- tools `hermes`  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;  `mistral` (pre-v11)
  `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;  `mistral-v11`  `[TOOL_CALLS]name[ARGS]{...}` per call.

Rules: a tool call that starts inside the thinking ends the thinking; a call's arguments are the raw text of the
first complete JSON value, and text after it is dropped up to the next call marker (hermes: up to `</tool_call>`);
whitespace-only content before a call, trailing whitespace of reasoning and leading whitespace of the answer after
the thinking are dropped. An output cut off inside a call keeps the call with the arguments produced so far.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from models.registry import ReasoningFormat, ToolFormat
from serve.formats import REASONING_FORMATS, TOOL_FORMATS, V11_ARGS, V11_CALL_ID

_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # set on the first delta of a call, with the name
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class ParsedMessage:
    """A whole message: what the non-streaming response shows and what a client assembles from the stream."""

    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, delta: ParsedDelta) -> None:
        if delta.reasoning:
            self.reasoning = (self.reasoning or "") + delta.reasoning
        if delta.content:
            self.content = (self.content or "") + delta.content
        for d in delta.tool_calls:
            if d.id is not None:
                self.tool_calls.append(ToolCall(d.id, d.name or "", d.arguments))
            else:
                self.tool_calls[d.index].arguments += d.arguments


class _JsonValue:
    """Finds where the first JSON value in a character stream ends (objects, arrays, strings, literals)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.kind = ""  # "", "container", "string", "literal"

    def feed(self, ch: str) -> str:
        """'skip' (whitespace before the value), 'in' (part of it), 'last' (ends it), 'after' (not part of it)."""
        if self.kind == "":
            if ch.isspace():
                return "skip"
            if ch in "{[":
                self.kind, self.depth = "container", 1
                return "in"
            if ch == '"':
                self.kind, self.in_string = "string", True
                return "in"
            self.kind = "literal"
            return "in"
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
                if self.kind == "string":
                    return "last"
            return "in"
        if self.kind == "literal":
            return "after" if (ch.isspace() or ch in ",}]") else "in"
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 0:
                return "last"
        return "in"


class _Envelope:
    """Streams one `{"name": ..., "arguments": {...}}` object: the name once known, then argument text."""

    def __init__(self) -> None:
        self.state = "open"  # open -> key -> colon -> value -> next -> done | bad
        self.key_raw = ""
        self.key = ""
        self.value: _JsonValue | None = None
        self.value_raw = ""
        self.name: str | None = None
        self.args_pending = ""  # argument text seen before the name
        self.args_seen = False

    def feed(self, ch: str) -> tuple[str | None, str]:
        """Consume one character; returns (name if it just became known, argument text to emit)."""
        st = self.state
        if st == "open":
            if ch == "{":
                self.state = "key"
            elif not ch.isspace():
                self.state = "bad"
            return None, ""
        if st == "key":
            if ch == '"':
                self.state, self.key_raw = "keystr", '"'
            elif ch == "}":
                self.state = "done"
            elif not (ch.isspace() or ch == ","):
                self.state = "bad"
            return None, ""
        if st == "keystr":
            self.key_raw += ch
            if ch == '"' and not _ends_in_escape(self.key_raw[:-1]):
                self.key = _loads_str(self.key_raw)
                self.state = "colon"
            return None, ""
        if st == "colon":
            if ch == ":":
                self.state, self.value, self.value_raw = "value", _JsonValue(), ""
            elif not ch.isspace():
                self.state = "bad"
            return None, ""
        if st == "value":
            assert self.value is not None
            status = self.value.feed(ch)
            if status == "skip":
                return None, ""
            if status == "after":  # a literal ended at this delimiter, which belongs to the object
                self.state = "key"
                name, text = self._value_done()
                _, more = self.feed(ch)
                return name, text + more
            self.value_raw += ch
            text = ""
            if self.key in _ARGUMENT_KEYS:
                self.args_seen = True
                if self.name is None:
                    self.args_pending += ch
                else:
                    text = ch
            if status == "last":
                self.state = "key"
                name, more = self._value_done()
                return name, text + more
            return None, text
        return None, ""

    def _value_done(self) -> tuple[str | None, str]:
        if self.key == "name" and self.name is None:
            value = _loads_str(self.value_raw)
            if value:
                self.name = value
                pending, self.args_pending = self.args_pending, ""
                return value, pending
        return None, ""

    @property
    def finished(self) -> bool:
        return self.state in ("done", "bad")


def _ends_in_escape(s: str) -> bool:
    return (len(s) - len(s.rstrip("\\"))) % 2 == 1


def _loads_str(raw: str) -> str:
    try:
        value = json.loads(raw)
    except ValueError:
        return ""
    return value if isinstance(value, str) else ""


class OutputParser:
    """Incremental parser for one choice. Construct with the model's formats; None disables that part."""

    def __init__(self, reasoning: ReasoningFormat | None, tools: ToolFormat | None,
                 new_id: Callable[[], str] | None = None) -> None:
        self.reasoning_format = reasoning
        self.tool_format = TOOL_FORMATS[tools] if tools else None
        self.think_start, self.think_end = REASONING_FORMATS[reasoning].markers if reasoning else ("", "")
        self.tool_start = self.tool_format.start if self.tool_format else ""
        self.tool_end = self.tool_format.end if self.tool_format else None
        self.new_id = new_id or (self.tool_format.new_id if self.tool_format else (lambda: ""))
        self.state = "content"  # content | reasoning | call_name | call_args | envelope | array | after_call
        self.buf = ""
        self.held_ws = ""  # trailing whitespace of content/reasoning, sent only if more text follows
        self.strip_leading = False  # drop whitespace at the start of the answer after the thinking
        self.num_calls = 0
        self.name_buf = ""
        self.args: _JsonValue | None = None
        self.args_sent = False
        self.envelope: _Envelope | None = None
        self._array_started = False

    @property
    def in_reasoning(self) -> bool:
        return self.state == "reasoning"

    @property
    def last_tool_name(self) -> str | None:
        """The name of the latest v11 call (a forced call picks its arguments' schema by it)."""
        if self.tool_format is None or self.tool_format.syntax != "name_args":
            return None
        return self.name_buf.strip() or None

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        self.buf += text
        while self.buf and self._step(out, final=False):
            pass
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        while self.buf and self._step(out, final=True):
            pass
        if self.state == "content" and self.held_ws and not self.num_calls:
            out.content += self.held_ws
        self.held_ws = ""
        self.buf = ""
        return out

    # -- states -----------------------------------------------------------------------------------------------

    def _markers(self) -> list[str]:
        if self.state == "content":
            return [m for m in (self.think_start, self.think_end, self.tool_start) if m]
        if self.state == "reasoning":
            return [m for m in (self.think_start, self.think_end, self.tool_start) if m]
        if self.state == "after_call":
            return [m for m in (self.tool_start, self.tool_end) if m]
        return []

    def _step(self, out: ParsedDelta, final: bool) -> bool:
        """Process as much of self.buf as is certain; False when waiting for more text."""
        if self.state in ("content", "reasoning", "after_call"):
            return self._text_step(out, final)
        if self.state == "call_name":
            return self._name_step(out, final)
        if self.state == "call_args":
            return self._args_step(out)
        if self.state in ("envelope", "array"):
            return self._envelope_step(out)
        raise AssertionError(self.state)

    def _text_step(self, out: ParsedDelta, final: bool) -> bool:
        markers = self._markers()
        hit, pos = None, len(self.buf)
        for m in markers:
            i = self.buf.find(m)
            if i != -1 and (i < pos or (i == pos and hit is not None and len(m) > len(hit))):
                hit, pos = m, i
        if hit is None:
            keep = 0 if final else _partial_marker_len(self.buf, markers)
            self._emit_text(out, self.buf[: len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            return False
        self._emit_text(out, self.buf[:pos])
        self.buf = self.buf[pos + len(hit):]
        self._on_marker(hit)
        return True

    def _emit_text(self, out: ParsedDelta, text: str) -> None:
        if self.state == "after_call" or not text:
            return
        if self.strip_leading:
            text = text.lstrip()
            if not text:
                return
            self.strip_leading = False
        text = self.held_ws + text
        body = text.rstrip()
        self.held_ws = text[len(body):]
        if self.state == "content":
            out.content += body
        else:
            out.reasoning += body

    def _on_marker(self, marker: str) -> None:
        if marker == self.tool_start:
            self.held_ws = ""  # whitespace-only text before a call is not content
            self.strip_leading = False
            self._start_call()
        elif marker == self.tool_end:  # only a marker after a call
            self.state = "content"
        elif marker == self.think_start and self.state == "content":
            self.held_ws = ""
            self.state = "reasoning"
            self.strip_leading = True
        elif marker == self.think_end and self.state == "reasoning":
            self.held_ws = ""
            self.state = "content"
            self.strip_leading = True
        # a repeated start marker inside the thinking, or a stray end marker in the answer, is dropped

    def _start_call(self) -> None:
        assert self.tool_format is not None
        syntax = self.tool_format.syntax
        if syntax == "name_args":
            self.state, self.name_buf = "call_name", ""
        elif syntax == "array":
            self.state, self.envelope = "array", None
            self._array_started = False
        else:
            self.state, self.envelope = "envelope", _Envelope()

    def _open_call(self, out: ParsedDelta, name: str) -> None:
        out.tool_calls.append(ToolCallDelta(self.num_calls, self.new_id(), name, ""))
        self.num_calls += 1
        self.args_sent = False

    def _send_args(self, out: ParsedDelta, text: str) -> None:
        if text:
            out.tool_calls.append(ToolCallDelta(self.num_calls - 1, None, None, text))
            self.args_sent = True

    def _close_call(self, out: ParsedDelta) -> None:
        if not self.args_sent:
            self._send_args(out, "{}")

    def _name_step(self, out: ParsedDelta, final: bool) -> bool:
        # v11: `name[ARGS]{...}`, older `name[CALL_ID]id[ARGS]{...}`, sometimes `name{...}`.
        buf = self.buf
        cut = [(i, m) for m in (V11_ARGS, V11_CALL_ID, "{") if (i := buf.find(m)) != -1]
        if not cut:
            keep = 0 if final else _partial_marker_len(buf, [V11_ARGS, V11_CALL_ID])
            self.name_buf += buf[: len(buf) - keep]
            self.buf = buf[len(buf) - keep:]
            return False
        i, m = min(cut)
        self.name_buf += buf[:i]
        if m == V11_CALL_ID:
            j = buf.find(V11_ARGS, i)
            if j == -1:
                self.buf = buf[i:]  # wait for [ARGS], keeping the call id (the name is taken)
                return False
            self.buf = buf[j + len(V11_ARGS):]
        else:
            self.buf = buf[i + len(m):] if m == V11_ARGS else buf[i:]
        name = self.name_buf.strip()
        if not name:
            self.state = "after_call"
            return True
        self._open_call(out, name)
        self.state, self.args = "call_args", _JsonValue()
        return True

    def _args_step(self, out: ParsedDelta) -> bool:
        assert self.args is not None
        sent = []
        for k, ch in enumerate(self.buf):
            status = self.args.feed(ch)
            if status == "skip":
                continue
            if status == "after":
                self._send_args(out, "".join(sent))
                self._close_call(out)
                self.buf = self.buf[k:]
                self.state = "after_call"
                return True
            sent.append(ch)
            if status == "last":
                self._send_args(out, "".join(sent))
                self._close_call(out)
                self.buf = self.buf[k + 1:]
                self.state = "after_call"
                return True
        self._send_args(out, "".join(sent))
        self.buf = ""
        return False

    def _envelope_step(self, out: ParsedDelta) -> bool:
        k = 0
        buf = self.buf
        while k < len(buf):
            ch = buf[k]
            if self.state == "array" and self.envelope is None:
                # pre-v11: `[{...}, {...}]`, or a bare `{...}`
                if ch.isspace() or (ch == "," and self._array_started):
                    k += 1
                    continue
                if ch == "[" and not self._array_started:
                    self._array_started = True
                    k += 1
                    continue
                if ch == "{":
                    self.envelope = _Envelope()
                    continue  # the envelope consumes the brace
                self.buf = buf[k:]
                self.state = "after_call"  # `]` or junk: the calls are over
                return True
            env = self.envelope
            assert env is not None
            name, text = env.feed(ch)
            k += 1
            if name is not None:
                self._open_call(out, name)
            if text and env.name is not None:
                self._send_args(out, text)
            if env.finished:
                if env.name is not None:
                    self._close_call(out)
                if self.state == "array" and self._array_started and env.state == "done":
                    self.envelope = None
                    continue
                self.buf = buf[k:]
                self.state = "after_call"
                return True
        self.buf = ""
        return False


def _partial_marker_len(text: str, markers: list[str]) -> int:
    """Length of the longest suffix of `text` that could be the start of a marker (held back until known)."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


def parse_whole(text: str, reasoning: ReasoningFormat | None, tools: ToolFormat | None,
                new_id: Callable[[], str] | None = None) -> ParsedMessage:
    parser = OutputParser(reasoning, tools, new_id)
    message = ParsedMessage()
    message.add(parser.feed(text))
    message.add(parser.finish())
    return message
