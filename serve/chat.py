"""Chat completions: render the conversation (with tools), then run the generation plan and parse its output.

A plan is one or more segments per choice. Most requests are a single segment. More happen when the server has to
steer the model: a thinking budget (the server closes the thinking when it runs out and lets the model answer), a
forced tool call (the server writes the call marker, the grammar constrains the arguments), or a structured answer
from a reasoning model (free thinking first, the constrained answer after it). Each segment is one engine request
whose prompt is the conversation plus everything produced so far, so vLLM's prefix cache makes the hand-over cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from models.registry import ModelSpec, ReasoningFormat, ToolFormat
from models.tokenizers import ChatTokenizer
from serve.engine import Constraint, Engine, EngineOutput, GenerationParams, Media, TokenLogprob
from serve.errors import APIError
from serve.formats import REASONING_FORMATS, ForcedStep
from serve.media import LoadedMedia
from serve.parsers import OutputParser, ParsedDelta
from serve.protocol import ChatCompletionRequest, NamedToolChoice
from serve.tools import (
    arguments_constraint,
    check_tool_request,
    forced_call_steps,
    mistral_call_id,
    render_tools_as_text,
    tool_choice,
    tools_for_template,
)

# Thinking budgets for OpenAI's reasoning_effort when the request gives no explicit max_reasoning_tokens.
EFFORT_BUDGET: dict[str, int | None] = {"none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": None}


@dataclass(frozen=True)
class ChatPlan:
    """What the server does around the model for one request, decided once from the request and the model."""

    reasoning: ReasoningFormat | None
    tools: ToolFormat | None  # None: do not look for calls (no tools, or tool_choice "none")
    forced: tuple[ForcedStep, ...] = ()  # tool_choice required / named
    constraint: Constraint | None = None  # response_format, structured_outputs, guided_*
    constraint_param: str | None = None  # which of those fields it came from (for 400s)
    budget: int | None = None  # max thinking tokens (None: no limit)
    # The server opens the thinking, ends it at the budget and writes the answer's prefix/constraint after it. Only
    # when the request asks (reasoning_effort or a budget): otherwise a constraint applies from the first token.
    steer_thinking: bool = False
    named_choice: bool = False
    parallel_tool_calls: bool = True
    include_reasoning: bool = True
    tool_defs: tuple[Any, ...] = ()

    @property
    def multi_segment(self) -> bool:
        return self.steer_thinking or len(self.forced) > 1


def _constraint(req: ChatCompletionRequest) -> tuple[str, Constraint] | None:
    found: list[tuple[str, Constraint]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", Constraint("json_object")))
    elif rf is not None and rf.type == "json_schema":
        assert rf.json_schema is not None
        found.append(("response_format", Constraint("json", rf.json_schema.schema_)))
    so = req.structured_outputs
    if so is not None:
        kind, value = next((k, getattr(so, a)) for k, a in (("json", "json_"), ("regex", "regex"), ("choice", "choice"),
                                                            ("grammar", "grammar"), ("json_object", "json_object"))
                           if getattr(so, a))
        found.append(("structured_outputs", Constraint(kind, None if kind == "json_object" else value)))  # type: ignore[arg-type]
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        if getattr(req, name) is not None:
            found.append((name, Constraint(kind, getattr(req, name))))  # type: ignore[arg-type]
    if len(found) > 1:
        raise APIError(400, f"only one output constraint per request; got {', '.join(n for n, _ in found)}",
                       param=found[1][0], code="invalid_value")
    return found[0] if found else None


def make_plan(req: ChatCompletionRequest, spec: ModelSpec) -> ChatPlan:
    check_tool_request(req, spec, spec.tool_format)
    choice = tool_choice(req)
    found = _constraint(req)
    constraint_param, constraint = found if found else (None, None)
    calling = bool(req.tools) and choice != "none"
    if constraint is not None and calling:
        raise APIError(400, "response_format / structured outputs cannot be combined with tool calling; "
                            "set tool_choice to 'none' or drop the constraint", param="response_format",
                       code="invalid_value")
    if req.max_reasoning_tokens is not None and req.thinking_token_budget is not None:
        raise APIError(400, "give max_reasoning_tokens or thinking_token_budget, not both",
                       param="thinking_token_budget", code="invalid_value")
    budget = req.max_reasoning_tokens if req.max_reasoning_tokens is not None else req.thinking_token_budget
    if spec.reasoning_format is None:
        for name in ("reasoning_effort", "max_reasoning_tokens", "thinking_token_budget"):
            if getattr(req, name) is not None:
                raise APIError(400, f"model '{spec.name}' is not a reasoning model (its registry entry names no "
                                    f"reasoning format), so {name} cannot apply", param=name, code="invalid_value")
    steer = spec.reasoning_format is not None and (budget is not None or req.reasoning_effort is not None)
    if budget is None and req.reasoning_effort is not None:
        budget = EFFORT_BUDGET[req.reasoning_effort]
    forced: tuple[ForcedStep, ...] = ()
    parallel = req.parallel_tool_calls is not False
    if calling and choice != "auto":
        assert spec.tool_format is not None and req.tools
        forced = tuple(forced_call_steps(spec.tool_format, req.tools, choice, parallel))
    return ChatPlan(reasoning=spec.reasoning_format, tools=spec.tool_format if calling else None, forced=forced,
                    constraint=constraint, constraint_param=constraint_param, budget=budget, steer_thinking=steer,
                    named_choice=isinstance(choice, NamedToolChoice), parallel_tool_calls=parallel,
                    include_reasoning=req.include_reasoning,
                    tool_defs=tuple(req.tools or ()))


# ---------------------------------------------------------------------------------------------------------------
# prompt


def conversation(req: ChatCompletionRequest, spec: ModelSpec, media: dict[str, dict[str, Any]] | None = None
                 ) -> list[dict[str, Any]]:
    """OpenAI messages as plain dicts for the template; Mistral gets its 9-character call ids. `media` maps a part's
    place ('messages[i].content[j]') to its checked payload (serve/media.py); messages with media keep their parts."""
    mistral = spec.chat_format == "mistral"
    fix_id: Callable[[str], str] = mistral_call_id if mistral else (lambda i: i)
    out = []
    for i, m in enumerate(req.messages):
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if media and m.media_parts():
            msg["content"] = [media[f"messages[{i}].content[{j}]"] if part.type != "text"
                              else {"type": "text", "text": part.text}  # type: ignore[union-attr]
                              for j, part in enumerate(m.content)]  # type: ignore[arg-type]
        if m.name and m.role in ("user", "system", "developer"):
            msg["name"] = m.name
        if m.tool_calls:
            msg["content"] = m.text() or None
            msg["tool_calls"] = [{"id": fix_id(c.id), "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in m.tool_calls]
        if m.role == "tool":
            msg["tool_call_id"] = fix_id(m.tool_call_id or "")
        if m.role == "assistant" and m.thinking() and spec.reasoning_format is not None:
            msg["reasoning_content"] = m.thinking()
        out.append(msg)
    return out


def render_prompt(spec: ModelSpec, tokenizer: ChatTokenizer, req: ChatCompletionRequest,
                  media: list[LoadedMedia] | None = None) -> tuple[list[int], Media | None]:
    """The chat request as prompt token ids, and its media as the engine takes them (raises ChatTemplateError when
    the template refuses the messages)."""
    if not media:
        return tokenizer.encode_chat(*template_inputs(spec, tokenizer, req)), None
    by_place = {item.param: item.part for item in media}
    ids, audio, _ = tokenizer.encode_chat_media(*template_inputs(spec, tokenizer, req, by_place))  # type: ignore[attr-defined]
    rate = tokenizer.audio_rate()  # type: ignore[attr-defined]
    # images go to the engine as the PIL images we checked: vLLM's processor sizes them as mistral_common did
    return ids, Media(audio=tuple((a, rate) for a in audio),
                      images=tuple(item.image for item in media if item.modality == "image"))


def template_inputs(spec: ModelSpec, tokenizer: ChatTokenizer, req: ChatCompletionRequest,
                    media: dict[str, dict[str, Any]] | None = None
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]:
    """(messages, tools, template kwargs) as this model's template takes them: what the server renders for a
    prompt and what training data renders (distill/chat_data.py), so a model trains on the format it is served in."""
    messages = conversation(req, spec, media)
    choice = tool_choice(req)
    # tool_choice "none": the tools stay out of the prompt (vLLM's --exclude-tools-when-tool-choice-none).
    tools = tools_for_template(req.tools) if req.tools and choice != "none" else None
    if not tokenizer.supports_tools:
        messages = render_tools_as_text(messages, tools)
        tools = None
    elif spec.chat_format == "hf":
        for m in messages:  # HF tool templates take arguments as objects
            for c in m.get("tool_calls") or []:
                with contextlib.suppress(ValueError):
                    c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    kwargs: dict[str, Any] = {}
    if spec.chat_format == "hf" and spec.reasoning_format is not None and req.reasoning_effort is not None:
        kwargs["reasoning_effort"] = req.reasoning_effort  # templates that know it (gpt-oss style) use it
        if req.reasoning_effort == "none":
            kwargs["enable_thinking"] = False  # Qwen3-style templates
    return messages, tools, kwargs


# ---------------------------------------------------------------------------------------------------------------
# running a plan


@dataclass
class Piece:
    """What one choice produced since the last piece."""

    index: int
    parsed: ParsedDelta
    num_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length", on the last piece of the choice


@dataclass
class _Segment:
    prefix: str = ""
    constraint: Constraint | None = None
    max_tokens: int | None = None
    stop_at: str | None = None  # ends the segment (the thinking's end marker); the plan continues after it


Generate = Callable[[list[int], GenerationParams, str], AsyncIterator[EngineOutput]]


async def run_choices(generate: Generate, engine: Engine, plan: ChatPlan, prompt_ids: list[int],
                      params: GenerationParams, request_id: str, index: int = 0) -> AsyncIterator[Piece]:
    """Run the plan for `params.n` choices (n > 1 only for single-segment plans), yielding parsed pieces."""
    n = params.n
    parsers = [OutputParser(plan.reasoning, plan.tools) for _ in range(n)]
    used = [0] * n
    context = list(prompt_ids)
    segment: _Segment | None = _first_segment(plan)
    step = 0
    finish = "stop"
    while segment is not None:
        if segment.prefix:  # text the server writes for the model: into the prompt and through the parser
            ids = engine.tokenizer.encode_piece(segment.prefix)
            context += ids
            for i in range(n):
                used[i] += len(ids)
                yield Piece(index + i, parsers[i].feed(segment.prefix), len(ids))
        left = params.max_tokens - max(used)
        if left <= 0:
            finish = "length"
            break
        seg_params = dataclasses.replace(
            params, max_tokens=min(left, segment.max_tokens or left), constraint=segment.constraint,
            skip_special_tokens=False, stop=params.stop + ((segment.stop_at,) if segment.stop_at else ()))
        last_reason: str | None = None
        stop_reason: str | int | None = None
        async with contextlib.aclosing(generate(context, seg_params, f"{request_id}-{step}")) as outputs:
            async for out in outputs:
                for c in out.choices:
                    i = c.index
                    used[i] += c.num_tokens
                    if n == 1:
                        context += c.token_ids
                    parsed = parsers[i].feed(c.text)
                    if c.finish_reason is not None:
                        last_reason, stop_reason = c.finish_reason, c.stop_reason
                    yield Piece(index + i, parsed, c.num_tokens, c.logprobs or [])
        finish = "length" if last_reason == "length" else "stop"
        if segment.stop_at and stop_reason == segment.stop_at:
            # vLLM cuts the stop string from the text (its tokens are in the context already)
            yield Piece(index, parsers[0].feed(segment.stop_at), 0)
        step += 1
        segment = _next_segment(plan, segment, parsers[0], last_reason, stop_reason) if n == 1 else None
    for i in range(n):
        yield Piece(index + i, parsers[i].finish(), 0, finish_reason=finish)


def _first_segment(plan: ChatPlan) -> _Segment:
    if not plan.multi_segment:
        first = plan.forced[0] if plan.forced else None
        return _Segment(prefix=first.prefix if first else "",
                        constraint=first.constraint if first else plan.constraint)
    if plan.steer_thinking and plan.reasoning is not None:
        start, end = REASONING_FORMATS[plan.reasoning].markers
        if plan.budget == 0:  # no thinking: write an empty thinking section and go straight to the answer
            return _answer_segment(plan, start + end)
        return _Segment(prefix=start, max_tokens=plan.budget, stop_at=end)
    return _answer_segment(plan, "")


def _answer_segment(plan: ChatPlan, prefix: str) -> _Segment:
    if plan.forced:
        return _Segment(prefix=prefix + plan.forced[0].prefix, constraint=plan.forced[0].constraint)
    return _Segment(prefix=prefix, constraint=plan.constraint)


def _next_segment(plan: ChatPlan, done: _Segment, parser: OutputParser, reason: str | None,
                  stop_reason: str | int | None) -> _Segment | None:
    if done.stop_at is not None:  # the thinking segment
        assert plan.reasoning is not None
        if stop_reason == done.stop_at:
            return _answer_segment(plan, "")
        if reason == "length" and parser.in_reasoning:  # budget spent: close the thinking for the model
            return _answer_segment(plan, REASONING_FORMATS[plan.reasoning].end)
        return None  # the model stopped (EOS or a stop string) inside its thinking
    if reason != "stop" or stop_reason is not None:
        return None
    # v11 forced call with several tools: after the chosen name comes `[ARGS]` and that tool's arguments
    steps = list(plan.forced)
    for k, s in enumerate(steps[:-1]):
        if done.prefix.endswith(s.prefix) and done.constraint == s.constraint:
            nxt = steps[k + 1]
            return _Segment(prefix=nxt.prefix, constraint=nxt.constraint
                            or arguments_constraint(list(plan.tool_defs), parser.last_tool_name))
    return None
