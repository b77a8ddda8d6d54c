"""Tool calling on /v1/chat/completions: the tools offered, the grammar that forces a call, and the parser that
turns the model's Hermes-style ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks into OpenAI's
``tool_calls``.

The convention is the Hermes one (Qwen2.5, SmolLM2's tool-use template, NousResearch's Hermes models): each call
is a JSON object with ``name`` and ``arguments`` inside ``<tool_call>`` tags. A model whose chat template renders
``tools`` itself gets them through the template; for a template that does not (the demo model's), the tools are
described in a system-prompt section written here (:func:`tools_system_section`).

``tool_choice`` ``required`` and a named function are guarantees, not hints: :func:`tool_call_spec` builds a
Lark grammar (llguidance's dialect, with each call's JSON embedded as ``%json`` schema) that the engine decodes
under, so the output always parses as calls whose arguments follow the tool's parameter schema. ``auto`` is
free generation, parsed afterwards: blocks that parse become calls, everything else stays content.

Pure Python over strings and dicts: nothing here touches the engine or the tokenizer.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Literal

from realizar.request import StructuredSpec

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
MAX_PARALLEL_CALLS = 4  # calls one forced response may hold: small models tend to repeat a call until max_tokens
# JSON inside a call is laid out as the model likes, with at most 40 whitespace characters per gap (as
# realizar.structured does for response_format: unbounded whitespace lets a small model never close an object)
_JSON_LAYOUT = {"whitespace_flexible": True, "whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,40}"}
_BLOCK = re.compile(re.escape(OPEN_TAG) + r"(.*?)(?:" + re.escape(CLOSE_TAG) + r"|\Z)", re.DOTALL)
_ID_ALPHABET = string.ascii_letters + string.digits

ChoiceMode = Literal["auto", "none", "required", "function"]


@dataclass(frozen=True)
class Tool:
    """One function the model may call. ``parameters`` is its arguments' JSON schema (an object schema)."""

    name: str
    description: str | None
    parameters: dict[str, Any]
    strict: bool = False  # OpenAI's function.strict: schema keywords the grammar cannot enforce are then a 400

    def openai(self) -> dict[str, Any]:
        """The tool as OpenAI's request spells it, which is what chat templates and the system section show."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """What a request lets the model do with its tools: ``auto`` (call or answer), ``none`` (tools not offered),
    ``required`` (at least one call), ``function`` (exactly the function ``name``)."""

    tools: tuple[Tool, ...]
    mode: ChoiceMode
    name: str | None = None  # the function, for mode "function"
    parallel: bool = True  # parallel_tool_calls: false allows at most one call

    @property
    def offered(self) -> tuple[Tool, ...]:
        """The tools the model is told about and may call."""
        if self.mode == "none":
            return ()
        if self.mode == "function":
            return tuple(t for t in self.tools if t.name == self.name)
        return self.tools

    @property
    def forced(self) -> bool:
        """Whether the output is constrained to tool calls."""
        return self.mode in ("required", "function")


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: ``arguments`` is the JSON text of the arguments object, as OpenAI sends it."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: new_call_id())

    def openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {"id": self.id, "type": "function",
                                "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class ParsedOutput:
    """A completion split into its text outside the calls (None when there is none) and its calls."""

    content: str | None
    calls: tuple[ToolCall, ...]


def new_call_id() -> str:
    """``call_`` and 24 random letters and digits, in the shape of OpenAI's ids."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


# ---------------------------------------------------------------------------------------------- prompt


def tools_system_section(choice: ToolChoice) -> str:
    """The system-prompt section that offers ``choice``'s tools to a model whose chat template does not render
    ``tools``: the tools as JSON inside ``<tools></tools>``, and how to answer with a call."""
    listed = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in choice.offered)
    if choice.mode == "function":
        rule = f"You must call the function {choice.name}."
    elif choice.mode == "required":
        rule = "You must call at least one of these functions."
    else:
        rule = "Call a function when it helps to answer; otherwise answer directly."
    if not choice.parallel:
        rule += " Make at most one call."
    return ("# Tools\n\n"
            "You can call functions. Their signatures are listed as JSON inside <tools></tools>:\n"
            f"<tools>\n{listed}\n</tools>\n\n"
            f"{rule} To call a function, write a JSON object with its name and its arguments inside "
            "<tool_call></tool_call> tags, like this:\n"
            '<tool_call>\n{"name": "function name", "arguments": {"argument name": "value"}}\n</tool_call>')


def with_tools_section(messages: list[dict[str, Any]], choice: ToolChoice) -> list[dict[str, Any]]:
    """``messages`` with the tools section added to their system prompt (a new system message first when the
    conversation has none); the caller's list and dicts are left as they are."""
    section = tools_system_section(choice)
    if messages and messages[0].get("role") in ("system", "developer"):
        first = messages[0]
        content = first.get("content")
        if isinstance(content, list):
            content = [*content, {"type": "text", "text": section}]
        else:
            content = f"{content}\n\n{section}" if content else section
        return [{**first, "content": content}, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]


# ---------------------------------------------------------------------------------------------- grammar


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_call_spec(choice: ToolChoice) -> StructuredSpec:
    """A Lark grammar whose every match is one ``<tool_call>`` block (up to :data:`MAX_PARALLEL_CALLS` with
    parallel calls allowed) holding ``{"name": <an offered tool>, "arguments": <valid under its parameters>}``.

    ``lenient`` unless every offered tool is ``strict``: schema keywords the library does not implement are then
    ignored rather than refused, as with ``response_format`` and strict false."""
    tools = choice.offered
    assert tools, "a forced tool call needs at least one tool"  # the protocol checks this at the edge
    options = {**_JSON_LAYOUT, "lenient": not all(t.strict for t in tools)}
    schemas = [_call_schema(t) for t in tools]
    schema = {**(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}), "x-guidance": options}
    block = f'"{OPEN_TAG}\\n" call "\\n{CLOSE_TAG}"'
    more = f' ("\\n" {block}){{0,{MAX_PARALLEL_CALLS - 1}}}' if choice.parallel and MAX_PARALLEL_CALLS > 1 else ""
    return StructuredSpec.grammar(f"start: {block}{more}\ncall: %json {json.dumps(schema, ensure_ascii=False)}\n")


# ---------------------------------------------------------------------------------------------- parsing


def _parse_call(body: str, names: frozenset[str]) -> ToolCall | None:
    """The call a block's body holds, or None when it is not a JSON object naming an offered tool with object
    arguments (or arguments given as the JSON text of an object)."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(str(value["name"]), json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str, choice: ToolChoice) -> ParsedOutput:
    """Split ``text`` into content and calls. Each ``<tool_call>...</tool_call>`` block whose body parses (see
    :func:`_parse_call`) is a call; a last block left open (cut by a stop string or at the end of the output)
    counts when its body is complete. Everything else is content; with ``parallel`` false, blocks after the
    first call stay content."""
    names = frozenset(t.name for t in choice.offered)
    calls: list[ToolCall] = []
    content: list[str] = []
    position = 0
    for match in _BLOCK.finditer(text):
        call = _parse_call(match.group(1), names) if (choice.parallel or not calls) else None
        content.append(text[position:match.start()] if call is not None else text[position:match.end()])
        position = match.end()
        if call is not None:
            calls.append(call)
    content.append(text[position:])
    rest = "".join(content).strip() if calls else "".join(content)
    return ParsedOutput(rest or None, tuple(calls))


class ToolCallStream:
    """Streams one choice's text with its calls taken out: text outside ``<tool_call>`` blocks goes on as
    content as it comes; a block is held until it closes, then comes out as one call (or, when it does not
    parse, as the content it is). The results equal :func:`parse_tool_calls` on the whole text, except that
    content sent before a call is known to come is not stripped."""

    def __init__(self, choice: ToolChoice) -> None:
        self.choice = choice
        self.calls: list[ToolCall] = []
        self._pending = ""  # text not yet sent: a block still open, or what may be the start of an opening tag
        self._space = ""  # whitespace-only content not yet sent

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """The content to send now and the calls completed by ``text``; ``final`` flushes what is held."""
        buffer = self._pending + text
        content: list[str] = []
        new: list[ToolCall] = []
        while buffer:
            start = buffer.find(OPEN_TAG)
            if start < 0:
                keep = 0 if final else _partial_tag_length(buffer)
                content.append(buffer[:len(buffer) - keep])
                buffer = buffer[len(buffer) - keep:]
                break
            content.append(buffer[:start])
            end = buffer.find(CLOSE_TAG, start + len(OPEN_TAG))
            if end < 0 and not final:
                buffer = buffer[start:]
                break
            stop = len(buffer) if end < 0 else end + len(CLOSE_TAG)
            allowed = self.choice.parallel or not self.calls
            call = _parse_call(buffer[start + len(OPEN_TAG):end if end >= 0 else len(buffer)],
                               frozenset(t.name for t in self.choice.offered)) if allowed else None
            if call is None:
                content.append(buffer[start:stop])
            else:
                self.calls.append(call)
                new.append(call)
            buffer = buffer[stop:]
        self._pending = buffer
        # Whitespace alone (the newlines between calls) is held until text follows, and dropped at the end when
        # there were calls, as the whole response's content is stripped: a client gets no "\n" content deltas.
        out = self._space + "".join(content)
        if out.strip():
            self._space = ""
        else:
            self._space, out = out, ""
            if final and not self.calls:
                self._space, out = "", self._space
        return out, new


def _partial_tag_length(text: str) -> int:
    """How many characters at the end of ``text`` could begin an opening tag (held back until it is known)."""
    for size in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1):
        if OPEN_TAG.startswith(text[-size:]):
            return size
    return 0
