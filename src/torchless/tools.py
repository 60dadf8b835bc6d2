"""Tool calling: OpenAI's `tools` / `tool_choice` on any chat model.

The form of a call is the Hermes one (NousResearch's Hermes 2 Pro, used by Qwen2.5, Qwen3 and
SmolLM3, and what llama.cpp and vLLM call "hermes"):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, a newline between blocks. It is the one form read and constrained here,
whatever the model: a template that takes `tools` (as transformers' apply_chat_template passes
them) describes them its own way; for one that does not, the system message gets Qwen2.5's
Hermes description (TOOLS_SYSTEM_PROMPT), assistant turns with tool_calls are written as those
blocks and `tool` messages become user turns of <tool_response> blocks, as Qwen2.5's template
writes them. A model taught another form (Llama 3.1's bare JSON, Mistral's [TOOL_CALLS]) is held
to this one under "required" and a named function; under "auto" a call in its own form comes
back as text.

tool_choice "required" or a named function keep the reply inside a grammar (llguidance) of
such blocks whose `arguments` validate against the function's `parameters` schema. "auto" is
lazy (grammar.TriggeredSampler): the model writes freely, and only once it has begun its reply
with `<tool_call>` is the rest held to that grammar. So the model alone chooses between text
and a call, a text reply pays nothing per token, and a call it starts always parses. (A grammar
allowing "text or a call" from the first token would also work, but would mask all 49k tokens at
every step of every plain reply.) "none" shows the model no tools and parses nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .errors import TorchlessError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TOOLS_SYSTEM_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n"
    "</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


class ToolError(TorchlessError):
    """A bad `tools` or `tool_choice`; `param` names the field (the server's 400 names it)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[dict, ...]     # OpenAI's {"type": "function", "function": {...}} entries, checked
    choice: str                 # "none", "auto", "required" or "function"
    name: str | None = None     # the function tool_choice names
    parallel: bool = True       # more than one call in a reply

    @property
    def calls_tools(self) -> bool:
        return self.choice != "none"

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def grammar_text(self) -> str:
        """The Lark grammar (llguidance's dialect, with its inline %json) of the calls allowed."""
        allowed = [t for t in self.tools if self.name in (None, t["function"]["name"])]
        schema = {"x-guidance": {"whitespace_flexible": False}, "anyOf": [
            {"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                              "arguments": _parameters(t)},
             "required": ["name", "arguments"], "additionalProperties": False} for t in allowed]}
        repeat = ' ("\\n" call)*' if self.parallel else ""
        return (f"start: call{repeat}\n"
                f'call: "{OPEN}\\n" %json {json.dumps(schema)} "\\n{CLOSE}"\n')

    def grammar(self, tokenizer, n_vocab: int):
        """(llguidance grammar, trigger): the trigger is set for "auto" (lazy), None otherwise;
        (None, None) for "none"."""
        from .grammar import compile_grammar

        if not self.calls_tools:
            return None, None
        try:
            grammar = compile_grammar(tokenizer, n_vocab, "lark", self.grammar_text())
        except TorchlessError as e:
            raise ToolError("tools", f"the functions' parameters cannot be compiled ({e})") from None
        return grammar, (OPEN if self.choice == "auto" else None)


def _parameters(tool: dict) -> dict:
    # OpenAI: a function without parameters takes none
    return tool["function"].get("parameters") or {"type": "object", "properties": {},
                                                   "additionalProperties": False}


def tool_request(tools, tool_choice=None, parallel_tool_calls=None) -> ToolRequest | None:
    """The checked request, or None when no tools are given. Errors name `tools` or `tool_choice`."""
    from .grammar import grammar_spec

    if tools is None or tools == []:
        if tool_choice not in (None, "none"):
            raise ToolError("tool_choice", "is only allowed when tools are given")
        return None
    if not isinstance(tools, (list, tuple)):
        raise ToolError("tools", f"must be a list of {{'type': 'function', 'function': {{...}}}}, got {tools!r}"[:200])
    seen = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ToolError("tools", f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError("tools", f"tools[{i}].function.name must be 1-64 letters, digits, _ or -, got {name!r}")
        if name in seen:
            raise ToolError("tools", f"two functions are named {name!r}")
        seen.add(name)
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise ToolError("tools", f"tools[{i}].function.parameters must be a JSON schema object")
            try:
                grammar_spec("json_schema", parameters)
            except TorchlessError as e:
                raise ToolError("tools", f"tools[{i}].function.parameters: {e}") from None
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolError("parallel_tool_calls", f"must be a boolean, got {parallel_tool_calls!r}")
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise ToolError("tool_choice", "must be 'none', 'auto', 'required' or "
                            "{'type': 'function', 'function': {'name': ...}}")
        if name not in seen:
            raise ToolError("tool_choice", f"names function {name!r}, which is not among the tools")
        return ToolRequest(tuple(tools), "function", name, parallel)
    if choice not in ("none", "auto", "required"):
        raise ToolError("tool_choice", f"must be 'none', 'auto', 'required' or "
                        f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}"[:200])
    return ToolRequest(tuple(tools), choice, None, parallel)


# -- the prompt ---------------------------------------------------------------------------------

def chat_with_tools(messages: list[dict], request: ToolRequest | None, template_takes_tools: bool):
    """(messages, extra template variables). A template that takes `tools` gets them and the
    turns as they are (each call's arguments as a dict, as transformers' templates expect);
    otherwise the Hermes text described above goes into the messages themselves."""
    shown = request is not None and request.calls_tools
    if template_takes_tools:
        turns = [dict(m, tool_calls=[_arguments_as_dict(c) for c in m["tool_calls"]])
                 if m.get("tool_calls") else m for m in messages]
        return turns, ({"tools": list(request.tools)} if shown else {})
    turns = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = "\n".join(f"{OPEN}\n{json.dumps(_call_json(c))}\n{CLOSE}" for c in m["tool_calls"])
            turns.append(dict(m, content="\n".join(filter(None, [m["content"], blocks]))))
        elif m["role"] == "tool":
            response = f"<tool_response>\n{m['content']}\n</tool_response>"
            if turns and turns[-1].get("_tool_responses"):  # consecutive results: one user turn
                turns[-1] = dict(turns[-1], content=turns[-1]["content"] + "\n" + response)
            else:
                turns.append({"role": "user", "content": response, "_tool_responses": True})
        else:
            turns.append(m)
    turns = [{k: v for k, v in m.items() if k != "_tool_responses"} for m in turns]
    if shown:
        described = TOOLS_SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t) for t in request.tools))
        if turns and turns[0]["role"] == "system":
            turns[0] = dict(turns[0], content=turns[0]["content"] + "\n\n" + described)
        else:
            turns.insert(0, {"role": "system", "content": described})
    return turns, {}


def _call_json(call) -> dict:
    function = call.get("function", {}) if isinstance(call, dict) else {}
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # written as given
    return {"name": function.get("name"), "arguments": arguments}


def _arguments_as_dict(call):
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise TorchlessError(f"each tool_calls entry needs a 'function', got {call!r}"[:200])
    return dict(call, function=dict(call["function"], arguments=_call_json(call)["arguments"]))


# -- the reply ----------------------------------------------------------------------------------

def _value_end(text: str, start: int) -> int | None:
    """Where the JSON object or array at text[start] ends, or None if it is not finished."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            escaped, in_string = (False, in_string) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def scan_calls(text: str) -> tuple[list[dict], bool]:
    """([{"name", "arguments" (the raw JSON text so far), "done"}], whole): the tool-call
    blocks a reply holds so far; whole is True when the text is nothing but finished blocks."""
    calls, pos = [], 0
    while True:
        pos_ws = len(text) - len(text[pos:].lstrip())
        if text.startswith(OPEN, pos_ws):
            pos = pos_ws + len(OPEN)
        else:
            return calls, bool(calls) and calls[-1]["done"] and not text[pos:].strip()
        head = _CALL_HEAD.match(text, pos)
        if head is None:
            return calls, False
        name, start = json.loads(head.group(1)), head.end()
        end = _value_end(text, start) if text[start:start + 1] in ("{", "[") else None
        call = {"name": name, "arguments": text[start:end] if end else text[start:], "done": False}
        calls.append(call)
        if end is None:
            return calls, False
        tail = re.compile(r"\s*\}\s*" + re.escape(CLOSE)).match(text, end)
        if tail is None:
            return calls, False
        call["done"], pos = True, tail.end()


def reply_message(text: str, reason: str | None, request: ToolRequest | None) -> tuple[dict, str | None]:
    """(the assistant message, finish reason) of a whole reply: OpenAI's shape of tool calls
    (content None, tool_calls, finish_reason "tool_calls") when parse_reply finds them."""
    calls = parse_reply(text, request)
    if calls is None:
        return dict(role="assistant", content=text), reason
    return dict(role="assistant", content=None, tool_calls=calls), ("tool_calls" if reason == "stop" else reason)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_reply(text: str, request: ToolRequest | None) -> list[dict] | None:
    """OpenAI's tool_calls list if the reply is tool calls to known functions with arguments
    that parse as JSON, else None (the reply is text)."""
    if request is None or not request.calls_tools:
        return None
    calls, whole = scan_calls(text)
    if not whole or any(c["name"] not in request.names for c in calls):
        return None
    try:
        for call in calls:
            json.loads(call["arguments"])
    except json.JSONDecodeError:
        return None
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


class ToolCallStream:
    """A reply's text as it grows -> OpenAI's stream deltas: {"content": ...} for text, and for
    each call first {"tool_calls": [{index, id, type, function: {name, arguments: ""}}]}, then
    {"tool_calls": [{index, function: {arguments: fragment}}]}. Text that may still become
    `<tool_call>` is held back until it is known not to."""

    def __init__(self, request: ToolRequest):
        self.request, self.text, self.mode = request, "", "undecided"
        self.sent_content, self.sent_args, self.ids = 0, [], []

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        if self.mode == "undecided":
            stripped = self.text.lstrip()
            if stripped.startswith(OPEN):
                self.mode = "calls"
            elif not OPEN.startswith(stripped):
                self.mode = "content"
        if self.mode == "content":
            return self._content()
        return self._calls(scan_calls(self.text)[0]) if self.mode == "calls" else []

    def step(self, piece: str, reason: str | None) -> tuple[list[dict], str | None]:
        """feed(piece), and at the reply's end (a reason) finish too: (deltas, finish reason)."""
        deltas = self.feed(piece)
        if reason is not None:
            more, reason = self.finish(reason)
            deltas += more
        return deltas, reason

    def finish(self, reason: str) -> tuple[list[dict], str]:
        """The last deltas and the finish reason ("tool_calls" for a reply of whole calls)."""
        if self.mode == "calls" and parse_reply(self.text, self.request) is not None:
            return self._calls(scan_calls(self.text)[0]), ("tool_calls" if reason == "stop" else reason)
        if self.ids:  # calls begun but cut short (max_tokens): OpenAI too leaves them partial
            return self._calls(scan_calls(self.text)[0]), reason
        self.mode = "content"
        return self._content(), reason

    def _content(self) -> list[dict]:
        new, self.sent_content = self.text[self.sent_content:], len(self.text)
        return [{"content": new}] if new else []

    def _calls(self, calls: list[dict]) -> list[dict]:
        deltas = []
        for index, call in enumerate(calls):
            if index == len(self.ids):
                self.ids.append(new_call_id())
                self.sent_args.append(0)
                deltas.append({"tool_calls": [{"index": index, "id": self.ids[index], "type": "function",
                                               "function": {"name": call["name"], "arguments": ""}}]})
            fragment = call["arguments"][self.sent_args[index]:]
            if fragment:
                self.sent_args[index] = len(call["arguments"])
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
        return deltas
