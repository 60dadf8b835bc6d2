"""The server's request fields: which OpenAI fields each endpoint takes, how one is checked,
and the error (OpenAI's shape, naming the field) for one that is wrong or not supported."""

from __future__ import annotations

import json

from starlette.responses import JSONResponse

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
DRAIN_BYTES = 16 << 20

# OpenAI's request fields. Each is honoured, or changes nothing here (user, metadata, ...), or is
# refused with a 400 naming it unless it asks for what the server does anyway (`_refuse`). The
# sampling fields of llama.cpp's server and vLLM (top_k, min_p, repeat_penalty, ...) are honoured
# too; any other field is refused, as OpenAI does. tools / tool_choice / parallel_tool_calls
# are checked by tools.tool_request.
SAMPLING_FIELDS = {"model", "max_tokens", "n", "stop", "temperature", "top_p", "seed", "stream",
                   "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "user",
                   "top_k", "min_p", "repeat_penalty", "repetition_penalty", "repeat_last_n"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = SAMPLING_FIELDS | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools",
    "tool_choice", "parallel_tool_calls", "functions", "function_call", "metadata", "store",
    "service_tier", "modalities", "audio", "prediction", "reasoning_effort", "web_search_options",
    "verbosity", "prompt_cache_key", "safety_identifier"}
# field -> whether its value asks for nothing more than the server does without it
_HARMLESS = {
    "suffix": lambda v: v is None or v == "",
    "functions": lambda v: v is None or v == [],
    "function_call": lambda v: v is None or v == "none",
    "modalities": lambda v: v is None or v == ["text"],
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "verbosity": lambda v: v is None,
    "store": lambda v: v is None or v is False,
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.code}}, status_code=self.status)


def _field(body: dict, name: str, types, default, check=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(400, f"'{name}' must be {what or types}, got {value!r}", name)
    if not isinstance(value, types) or (check is not None and not check(value)):
        raise APIError(400, f"'{name}' must be {what or types}, got {value!r}", name)
    return value


def _refuse(body: dict, known: set) -> None:
    """A 400 naming the first field that is unknown, or asks for what is not supported yet."""
    for name in body:
        if name not in known:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", name)
    for name, harmless in _HARMLESS.items():
        if name in body and not harmless(body[name]):
            raise APIError(400, f"'{name}' is not supported yet (got {json.dumps(body[name])[:80]})", name)
    if body.get("best_of") is not None and body["best_of"] != body.get("n", 1):
        raise APIError(400, "'best_of' is not supported yet (other than equal to n)", "best_of")
