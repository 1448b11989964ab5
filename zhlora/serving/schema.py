"""What a chat request to `zhlora serve` may hold, and how a refusal looks (OpenAI's error shape).

    ChatRequest.model_validate(body)   # strict pydantic: "5" is not 5, 1.0 is not a bool
    APIError(400, "messages: ...", "messages", "invalid_value").response()

Every refusal is `{"error": {"message", "type", "param", "code"}}`, as OpenAI writes it; a
pydantic validation error becomes one 400 naming the field as OpenAI does ("messages[0].content").
Unknown request fields (frequency_penalty, user, ...) are ignored, as most OpenAI-compatible
servers do; n must be 1. The routes that use these are in serving/app.py.
"""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


# strict: "5" is not 5 and 1.0 is not a bool; a wrong type is the client's bug, not a guess for us.
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]  # OpenAI clients may send [{"type": "text", "text": ...}]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str = "default"
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name for max_tokens
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None  # 0 = greedy
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


_FIELDS = {name for schema in (ChatRequest, Message, TextPart, StreamOptions) for name in schema.model_fields}


class APIError(Exception):
    """A refusal the client can act on, rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _param(loc) -> str | None:
    """("body", "messages", 0, "content", "str") -> "messages[0].content", as OpenAI names a field.

    Pydantic adds the tried member of a union ("str", "list[TextPart]") to the path: dropped.
    """
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELDS:
            out += f".{part}" if out else part
    return out or None


def validation_error(errors) -> APIError:
    # A union (stop: str | list) reports one error per member; a value error ("too long") says more
    # than "not a string", so it wins.
    first = next((e for e in errors if not e["type"].endswith("_type")), errors[0])
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return APIError(400, f"We could not parse the JSON body of your request: {reason}".rstrip(": "),
                        code="invalid_json")
    param = _param(first["loc"])
    others = len({_param(e["loc"]) for e in errors} - {param})
    more = f" (and {others} more problems)" if others else ""
    code = "invalid_type" if first["type"].endswith(("_type", "_parsing", "literal_error")) else "invalid_value"
    return APIError(400, f"{param or 'body'}: {first['msg']}{more}", param, code)
