"""Function calling around the engine: request checks, prompt rendering of tools, and forced calls.

Forced calls (`tool_choice` "required" or named) do not trust a small model to follow instructions: the server writes
the format's call marker itself (`<tool_call>`, `[TOOL_CALLS]`, `[TOOL_CALLS]name[ARGS]`) and constrains what follows
with a JSON schema through the engine's structured outputs, so even a 135M model returns arguments that validate.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from models.registry import ModelSpec, ToolFormat
from serve.engine import Constraint
from serve.errors import APIError
from serve.formats import ALNUM, HERMES, TOOL_FORMATS, ForcedStep
from serve.protocol import ChatCompletionRequest, NamedToolChoice, Tool


def tool_choice(req: ChatCompletionRequest) -> str | NamedToolChoice:
    """OpenAI's default: "auto" when tools are given, else "none"."""
    if req.tool_choice is not None:
        return req.tool_choice
    return "auto" if req.tools else "none"


def check_tool_request(req: ChatCompletionRequest, spec: ModelSpec, tool_format: ToolFormat | None) -> None:
    choice = tool_choice(req)
    if not req.tools:
        if choice != "none":
            raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
        return
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique", param="tools", code="invalid_value")
    if tool_format is None and choice != "none":
        raise APIError(400, f"model '{spec.name}' cannot call tools: its registry entry names no tool format "
                            "(start the server with --tool-format to set one)", param="tools",
                       code="tools_unsupported")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise APIError(400, f"tool_choice names function '{choice.function.name}', which is not in tools "
                            f"({', '.join(names)})", param="tool_choice", code="invalid_value")


def mistral_call_id(call_id: str) -> str:
    """Mistral templates accept only 9 alphanumerics: map other ids (OpenAI's `call_...`) stably onto that form."""
    if len(call_id) == 9 and call_id.isascii() and call_id.isalnum():
        return call_id
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(ALNUM[b % len(ALNUM)] for b in digest[:9])


def tools_for_template(tools: list[Tool]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t.function.name, "description": t.function.description or "",
                                              "parameters": t.function.parameters_schema()}} for t in tools]


# ---------------------------------------------------------------------------------------------------------------
# templates without tool support (SmolLM2's): tools in the system prompt, calls and results as hermes text

TOOL_SYSTEM_PROMPT = """You can call functions. The available functions, as JSON Schema, are:
<tools>
{tools}
</tools>
To call a function, answer with one block per call, each holding a JSON object with the function's name and \
arguments:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-object>}}
</tool_call>"""


def hermes_call_text(name: str, arguments: str) -> str:
    try:
        args: Any = json.loads(arguments)
    except ValueError:
        args = arguments
    return f"{HERMES.start}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{HERMES.end}"


def render_tools_as_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Rewrite an OpenAI conversation with tools for a plain chat template (documented in the README)."""
    out: list[dict[str, Any]] = []
    if tools:
        prompt = TOOL_SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": prompt})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(hermes_call_text(c["function"]["name"], c["function"]["arguments"])
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": "\n".join(x for x in (m.get("content") or "", calls) if x)})
        elif m["role"] == "tool":
            result = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "_tool_results": True})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content", "name")})
    for m in out:
        m.pop("_tool_results", None)
    return out


# ---------------------------------------------------------------------------------------------------------------
# forced calls


def forced_call_steps(fmt: ToolFormat, tools: list[Tool], choice: str | NamedToolChoice, parallel: bool
                      ) -> list[ForcedStep]:
    """The steps that make the model call a tool (the format's own recipe; a named choice allows one tool)."""
    if isinstance(choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == choice.function.name]
        parallel = False
    return TOOL_FORMATS[fmt].forced_steps(tools, parallel)


def arguments_constraint(tools: list[Tool], name: str | None) -> Constraint:
    for t in tools:
        if t.function.name == name:
            return Constraint("json", t.function.parameters_schema())
    return Constraint("json_object")
