"""Every tool-call and reasoning format the server knows, one record each, keyed by the registry's name.

A record holds all of a format's facts: its markers, how a call is written after the marker (which the one
incremental parser in `serve/parsers.py` follows), the style of its call ids, and the steps that force a call
(`tool_choice` required or named). A new format is one record here plus its name in `models/registry.py`
(`ToolFormat` / `ReasoningFormat`); the CLI choices, the parser, forced calls, the llama.cpp engine's preserved
tokens and the eval checks all read these tables.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from models.registry import ReasoningFormat, ToolFormat
from serve.engine import Constraint
from serve.protocol import Tool

ALNUM = string.ascii_letters + string.digits  # the alphabet of tool-call ids
V11_ARGS = "[ARGS]"
V11_CALL_ID = "[CALL_ID]"


def openai_tool_call_id() -> str:
    return "call_" + "".join(secrets.choice(ALNUM) for _ in range(24))


def mistral_tool_call_id() -> str:
    """Mistral's format: 9 random alphanumerics (mistral_common rejects other ids in the history)."""
    return "".join(secrets.choice(ALNUM) for _ in range(9))


@dataclass(frozen=True)
class ForcedStep:
    """Text the server writes for the model, then a constraint on what the model writes next."""

    prefix: str
    constraint: Constraint | None  # None: filled in from the call name chosen in the previous step


# How the text after a call marker is written (the parser has one state per syntax):
#   envelope   {"name": ..., "arguments": {...}}            (then, optionally, the format's end marker)
#   array      [{"name": ..., "arguments": {...}}, ...]     (a bare envelope is accepted too)
#   name_args  name[ARGS]{...}, or name[CALL_ID]id[ARGS]{...}
CallSyntax = Literal["envelope", "array", "name_args"]


@dataclass(frozen=True)
class ToolFormatSpec:
    name: ToolFormat
    start: str  # the marker that opens a call
    end: str | None  # the marker that closes one (hermes), or None
    syntax: CallSyntax
    new_id: Callable[[], str]  # id style of the calls the server returns
    forced_steps: Callable[[list[Tool], bool], list[ForcedStep]]  # (allowed tools, parallel) -> steps
    extra_markers: tuple[str, ...] = ()  # other marker tokens the output may hold

    @property
    def markers(self) -> tuple[str, ...]:
        return (self.start, *((self.end,) if self.end else ()), *self.extra_markers)


@dataclass(frozen=True)
class ReasoningFormatSpec:
    name: ReasoningFormat
    start: str
    end: str

    @property
    def markers(self) -> tuple[str, ...]:
        return (self.start, self.end)


def envelope_schema(tools: list[Tool]) -> dict[str, Any]:
    """`{"name": <one of the tools>, "arguments": <that tool's parameters>}` as a JSON Schema."""
    variants = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                  "arguments": t.function.parameters_schema()},
                 "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _hermes_steps(tools: list[Tool], parallel: bool) -> list[ForcedStep]:
    """One call: the JSON after `<tool_call>` is the envelope."""
    return [ForcedStep(HERMES.start + "\n", Constraint("json", envelope_schema(tools)))]


def _mistral_steps(tools: list[Tool], parallel: bool) -> list[ForcedStep]:
    """Pre-v11: `[TOOL_CALLS]` then a JSON array of envelopes."""
    array: dict[str, Any] = {"type": "array", "items": envelope_schema(tools), "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    return [ForcedStep(MISTRAL.start, Constraint("json", array))]


def _mistral_v11_steps(tools: list[Tool], parallel: bool) -> list[ForcedStep]:
    """v11+: `[TOOL_CALLS]name[ARGS]{...}`; with several tools the name is chosen first, then its arguments."""
    if len(tools) == 1:
        t = tools[0]
        return [ForcedStep(f"{MISTRAL_V11.start}{t.function.name}{V11_ARGS}",
                           Constraint("json", t.function.parameters_schema()))]
    return [ForcedStep(MISTRAL_V11.start, Constraint("choice", [t.function.name for t in tools])),
            ForcedStep(V11_ARGS, None)]


HERMES = ToolFormatSpec("hermes", "<tool_call>", "</tool_call>", "envelope", openai_tool_call_id, _hermes_steps)
MISTRAL = ToolFormatSpec("mistral", "[TOOL_CALLS]", None, "array", mistral_tool_call_id, _mistral_steps)
MISTRAL_V11 = ToolFormatSpec("mistral-v11", "[TOOL_CALLS]", None, "name_args", mistral_tool_call_id,
                             _mistral_v11_steps, extra_markers=(V11_ARGS, V11_CALL_ID))

TOOL_FORMATS: dict[str, ToolFormatSpec] = {f.name: f for f in (HERMES, MISTRAL, MISTRAL_V11)}
REASONING_FORMATS: dict[str, ReasoningFormatSpec] = {f.name: f for f in (
    ReasoningFormatSpec("think-tags", "<think>", "</think>"),
    ReasoningFormatSpec("mistral-think", "[THINK]", "[/THINK]"),
)}


def output_markers(tools: ToolFormat | None, reasoning: ReasoningFormat | None) -> tuple[str, ...]:
    """Marker strings a model with these formats writes (engines must keep them in the output text)."""
    found = TOOL_FORMATS[tools].markers if tools else ()
    return found + (REASONING_FORMATS[reasoning].markers if reasoning else ())


ALL_MARKERS: tuple[str, ...] = tuple(dict.fromkeys(
    m for f in (*TOOL_FORMATS.values(), *REASONING_FORMATS.values()) for m in f.markers))
